"""The bottom layer's helpers: argument checks, atomic files, records."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from tbptt.files import (
    atomic_write,
    atomic_write_text,
    check_writable,
    leftover_temporaries,
)
from tbptt.records import History, NonFiniteError, UpdateRecord
from tbptt.validate import (
    InvalidArgument,
    fraction,
    non_negative_number,
    one_of,
    positive_int,
    positive_number,
)


@pytest.mark.parametrize("call,message", [
    (lambda: positive_int(0, "segment_length", "steps per call"), r"segment_length must be a positive int \(steps per call\); got 0"),
    (lambda: positive_int(True, "k1"), "k1 must be a positive int; got True"),
    (lambda: positive_int(2.0, "k1"), "k1 must be a positive int; got 2.0"),
    (lambda: positive_number(float("nan"), "lr"), "lr must be a positive number; got nan"),
    (lambda: positive_number("x", "lr"), "lr must be a positive number; got 'x'"),
    (lambda: non_negative_number(-1, "clip", "0 turns clipping off"), r"clip must be a number >= 0 \(0 turns clipping off\); got -1"),
    (lambda: fraction(1.0, "fraction"), r"fraction must be a number in \(0, 1\); got 1.0"),
    (lambda: one_of("x", "strategy", ("recompute", "stored")), "strategy must be one of 'recompute', 'stored'; got 'x'"),
])
def test_checks_name_the_value_and_what_was_expected(call, message):
    with pytest.raises(InvalidArgument, match=message):
        call()


def test_checks_accept_numpy_scalars_and_none_where_it_has_a_meaning():
    assert positive_int(np.int64(3), "k") == 3 and isinstance(positive_int(np.int64(3), "k"), int)
    assert positive_number(np.float32(0.5), "lr") == 0.5
    assert positive_int(None, "k2", none="n") is None
    with pytest.raises(InvalidArgument):
        positive_int(None, "k2")


def test_a_check_renamed_to_a_flag_keeps_its_message():
    with pytest.raises(InvalidArgument) as info:
        positive_int(0, "segment_length")
    flagged = info.value.renamed("--segment-length")
    assert str(flagged) == "--segment-length must be a positive int; got 0" and flagged.name == "--segment-length"
    assert isinstance(flagged, ValueError)


def test_a_wrong_kind_is_both_a_type_and_a_value_error():
    with pytest.raises(TypeError):
        positive_int("3", "k1")
    with pytest.raises(ValueError):
        positive_int("3", "k1")


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "old")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "old" and leftover_temporaries(path) == []


def test_atomic_write_uses_the_umask_and_clears_a_killed_writers_temporaries(tmp_path):
    stale = tmp_path / ".a.txt.abc123.tmp"
    stale.write_text("left by a kill -9")
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "new")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not stale.exists() and path.read_text() == "new"


def test_check_writable_names_the_option_and_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"--log '.*file/x.jsonl': '.*file' is a file, not a folder"):
        check_writable(blocker / "x.jsonl", "--log")
    with pytest.raises(ValueError, match="is a folder"):
        check_writable(tmp_path, "checkpoint")
    assert check_writable(tmp_path / "new" / "run.pt", "checkpoint") == tmp_path / "new" / "run.pt"


def test_non_finite_errors_do_not_share_their_records():
    a, b = NonFiniteError("a"), NonFiniteError("b")
    a.records.append(UpdateRecord(0, 0, 1, 0.5, 1.0, 0.01))
    assert b.records == [] and len(a.records) == 1


def test_history_round_trips_and_writes_every_epoch_key(tmp_path):
    history = History(epochs=[{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5, "partial": True}],
                      records=[UpdateRecord(0, 0, 4, 0.5, 1.0, 0.01, True, "non-finite loss")],
                      diverged=True, stopped_by="diverged", best_epoch=1)
    history.add(UpdateRecord(4, 4, 8, 0.25, 2.0, 0.01))
    copy = History(records=[])
    copy.load_state_dict(history.state_dict())
    assert copy == history
    text = history.write(tmp_path / "log.csv").read_text().splitlines()
    assert text[0] == "epoch,train_loss,partial" and text[2] == "2,0.5,True"
