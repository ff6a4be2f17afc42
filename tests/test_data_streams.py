"""Stream arrangements: row continuity, padding and masks, packed resets, segments and shards."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from tbptt.data import (
    Split,
    forecasting_pairs,
    packed_streams,
    padded_batch,
    stateful_streams,
)


def valid_steps_of_rows(split: Split, field: str = "inputs") -> torch.Tensor:
    """The valid steps of every row, concatenated in row order."""
    values = getattr(split, field)
    mask = split.mask if split.mask is not None else torch.ones(values.shape[:2], dtype=torch.bool)
    return torch.cat([values[row][mask[row]] for row in range(values.shape[0])])


def make_split(b=4, t=6, f=2, mask=True, resets=True):
    x = torch.arange(b * t * f, dtype=torch.float32).view(b, t, f)
    m = torch.rand(b, t) > 0.3 if mask else None
    r = torch.rand(b, t) > 0.7 if resets else None
    return Split(x, -x, m, r)


# ---------------------------------------------------------------- Split


def test_split_segments_cover_the_steps_in_order():
    s = make_split(t=10)
    pieces = list(s.segments(4))
    assert [p.steps for p in pieces] == [4, 4, 2]
    for field in ("inputs", "targets", "mask", "resets"):
        assert torch.equal(torch.cat([getattr(p, field) for p in pieces], dim=1), getattr(s, field))
    assert sum(p.valid_steps for p in pieces) == s.valid_steps == int(s.mask.sum())


def test_split_rows_shard_contiguously_and_reject_uneven_worlds():
    s = make_split(b=6)
    shards = [s.rows(rank, 3) for rank in range(3)]
    assert [sh.batch_size for sh in shards] == [2, 2, 2]
    for field in ("inputs", "targets", "mask", "resets"):
        assert torch.equal(torch.cat([getattr(sh, field) for sh in shards]), getattr(s, field))
    with pytest.raises(ValueError, match=r"B=6.*world=4"):
        s.rows(0, 4)
    with pytest.raises(ValueError, match="rank"):
        s.rows(3, 3)


def test_split_validates_shapes_and_types():
    x = torch.zeros(2, 5, 3)
    with pytest.raises(TypeError, match="inputs"):
        Split(np.zeros((2, 5, 3)), x)
    with pytest.raises(ValueError, match=r"\[B, T, \.\.\.\]"):
        Split(torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
        Split(x, torch.zeros(2, 4, 3))
    with pytest.raises(TypeError, match="bool"):
        Split(x, x, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"resets must be \[B, T\]"):
        Split(x, x, resets=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="length"):
        next(Split(x, x).segments(0))
    assert Split(x, x).valid_steps == 10


# ---------------------------------------------------------------- stateful_streams


@settings(max_examples=60, deadline=None)
@given(n=hs.integers(1, 40), b=hs.integers(1, 40), features=hs.sampled_from([None, 1, 3]))
def test_stateful_rows_continue_each_other_and_drop_nothing(n, b, features):
    if b > n:
        with pytest.raises(ValueError, match=f"batch_size={b}"):
            stateful_streams(torch.zeros(n), torch.zeros(n), b)
        return
    shape = (n,) if features is None else (n, features)
    series = torch.arange(float(np.prod(shape))).view(shape)
    s = stateful_streams(series, series * 10, b)
    assert s.batch_size == b and s.resets is None
    assert torch.equal(valid_steps_of_rows(s), series)
    assert torch.equal(valid_steps_of_rows(s, "targets"), series * 10)
    lengths = [n // b + (row < n % b) for row in range(b)]
    assert s.steps == max(lengths)
    if n % b == 0:
        assert s.mask is None
    else:
        assert s.mask.sum(1).tolist() == lengths
        # each row's valid steps come first, then padding of zeros
        for row, length in enumerate(lengths):
            assert s.mask[row, :length].all() and not s.mask[row, length:].any()
            assert (s.inputs[row, length:] == 0).all()
    assert s.inputs.shape[2:] == series.shape[1:]


def test_stateful_streams_hand_case_and_own_mask():
    series = torch.arange(7.0)
    observed = torch.tensor([True, True, False, True, True, True, True])
    s = stateful_streams(series, series + 1, 3, mask=observed)
    assert s.inputs.tolist() == [[0, 1, 2], [3, 4, 0], [5, 6, 0]]
    assert s.targets.tolist() == [[1, 2, 3], [4, 5, 0], [6, 7, 0]]
    assert s.mask.tolist() == [[True, True, False], [True, True, False], [True, True, False]]


def test_stateful_streams_accepts_numpy_and_rejects_bad_input():
    s = stateful_streams(np.arange(6, dtype=np.int64), np.arange(1, 7, dtype=np.int64), 2)
    assert s.inputs.tolist() == [[0, 1, 2], [3, 4, 5]] and s.inputs.dtype == torch.int64
    with pytest.raises(ValueError, match=r"\(6,\) and \(5,\)"):
        stateful_streams(torch.zeros(6), torch.zeros(5), 2)
    with pytest.raises(TypeError, match="inputs"):
        stateful_streams([1.0, 2.0], torch.zeros(2), 1)
    with pytest.raises(ValueError, match="batch_size"):
        stateful_streams(torch.zeros(6), torch.zeros(6), 0)
    with pytest.raises(ValueError, match="mask"):
        stateful_streams(torch.zeros(6), torch.zeros(6), 2, mask=torch.ones(5, dtype=torch.bool))


# ---------------------------------------------------------------- padded_batch


def test_padded_batch_pads_right_and_masks_the_padding():
    xs = [torch.ones(3, 2), 2 * torch.ones(1, 2), 3 * torch.ones(2, 2)]
    ys = [x[:, :1] * 10 for x in xs]
    s = padded_batch(xs, ys)
    assert s.inputs.shape == (3, 3, 2) and s.targets.shape == (3, 3, 1)
    assert s.mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert s.inputs[:, :, 0].tolist() == [[1, 1, 1], [2, 0, 0], [3, 3, 0]]
    assert s.targets[:, :, 0].tolist() == [[10, 10, 10], [20, 0, 0], [30, 30, 0]]
    assert s.resets is None
    assert padded_batch([torch.zeros(2)] * 2, [torch.zeros(2)] * 2).mask is None


def test_padded_batch_combines_sequence_masks_with_padding():
    xs = [torch.zeros(3), torch.zeros(2)]
    s = padded_batch(xs, xs, masks=[torch.tensor([False, True, True]), torch.tensor([True, False])])
    assert s.mask.tolist() == [[False, True, True], [True, False, False]]


def test_padded_batch_rejects_bad_sequences():
    with pytest.raises(ValueError, match=r"sequence 1: inputs are torch.float32 \[T, 3\]"):
        padded_batch([torch.zeros(2, 2), torch.zeros(2, 3)], [torch.zeros(2)] * 2)
    with pytest.raises(ValueError, match="sequence 0.*non-empty"):
        padded_batch([torch.zeros(0, 2)], [torch.zeros(0)])
    with pytest.raises(ValueError, match="sequence 0.*same length"):
        padded_batch([torch.zeros(3)], [torch.zeros(2)])
    with pytest.raises(ValueError, match="2 inputs and 1 targets"):
        padded_batch([torch.zeros(2)] * 2, [torch.zeros(2)])
    with pytest.raises(TypeError, match="list"):
        padded_batch(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="masks"):
        padded_batch([torch.zeros(2)], [torch.zeros(2)], masks=[torch.ones(3, dtype=torch.bool)])


# ---------------------------------------------------------------- packed_streams


def test_packed_streams_hand_case():
    lengths = [3, 1, 2, 2]
    xs = [torch.full((n,), float(i + 1)) for i, n in enumerate(lengths)]
    s = packed_streams(xs, [-x for x in xs], 2)
    # doc0 -> row0; doc1 -> row1 (shorter); doc2 -> row1 (1 < 3); doc3 -> row0 (tie 3 = 3, lower row)
    assert s.inputs.tolist() == [[1, 1, 1, 4, 4], [2, 3, 3, 0, 0]]
    assert torch.equal(s.targets, -s.inputs)
    assert s.resets.tolist() == [[True, False, False, True, False], [True, True, False, False, False]]
    assert s.mask.tolist() == [[True] * 5, [True, True, True, False, False]]


@settings(max_examples=60, deadline=None)
@given(lengths=hs.lists(hs.integers(1, 9), min_size=1, max_size=20), b=hs.integers(1, 6))
def test_packed_streams_place_every_document_once_with_a_reset_at_its_start(lengths, b):
    docs = [torch.arange(n) + 100 * i for i, n in enumerate(lengths)]
    s = packed_streams(docs, docs, b)
    assert s.batch_size == b and s.resets is not None
    valid = s.mask if s.mask is not None else torch.ones(b, s.steps, dtype=torch.bool)
    assert not (s.resets & ~valid).any()
    found = []
    for row in range(b):
        starts = s.resets[row].nonzero().flatten().tolist()
        ends = starts[1:] + [int(valid[row].sum())]
        assert valid[row, : ends[-1]].all() and not valid[row, ends[-1]:].any()
        found += [s.inputs[row, a:e] for a, e in zip(starts, ends)]
    # cutting the rows at the resets gives back the documents (ids 100 * i tell them apart)
    assert sorted(tuple(d.tolist()) for d in found) == sorted(tuple(d.tolist()) for d in docs)
    row_lengths = valid.sum(1)
    assert int(row_lengths.max() - row_lengths.min()) <= max(lengths)


def test_packed_streams_keep_document_masks():
    docs = [torch.zeros(2), torch.zeros(3)]
    last = [torch.tensor([False, True]), torch.tensor([False, False, True])]
    s = packed_streams(docs, docs, 1, masks=last)
    assert s.mask.tolist() == [[False, True, False, False, True]]
    assert s.resets.tolist() == [[True, False, True, False, False]]


def test_packed_streams_leave_rows_without_documents_all_padding():
    s = packed_streams([torch.ones(2)], [torch.ones(2)], 3)
    assert s.mask.tolist() == [[True, True], [False, False], [False, False]]
    assert s.resets.tolist() == [[True, False], [False, False], [False, False]]


# ---------------------------------------------------------------- forecasting_pairs


def test_forecasting_pairs_align_input_and_later_target():
    x, y = forecasting_pairs(torch.arange(6.0), horizon=2)
    assert x.tolist() == [0, 1, 2, 3] and y.tolist() == [2, 3, 4, 5]
    x, y = forecasting_pairs(torch.arange(8.0).view(4, 2))
    assert x.tolist() == [[0, 1], [2, 3], [4, 5]] and y.tolist() == [[2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="horizon < 3"):
        forecasting_pairs(torch.zeros(3), horizon=3)
    with pytest.raises(ValueError, match="horizon"):
        forecasting_pairs(torch.zeros(3), horizon=0)
    with pytest.raises(ValueError, match=r"\[T\] or \[T, F\]"):
        forecasting_pairs(torch.zeros(3, 2, 2))
