"""``--threads N`` on every command that computes: one option, checked before any work, the count
in force while the command works and the caller's count back afterwards."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from tbptt import bench
from tbptt.cli import build_parser, main
from tbptt.commands import check, demo, options, probe
from tbptt.experiments import sweep
from tbptt.experiments.runs import torch_threads
from tbptt.trainer import Trainer

ECHO = ["--task", "echo", "--task-option", "steps=24", "--task-option", "eval_steps=12",
        "--task-option", "batch_size=2", "--hidden", "4"]
# each computing command, with what makes it small
COMMANDS = {
    "train": ["train", *ECHO, "--config", "4,8", "--epochs", "1"],
    "compare": ["compare", *ECHO, "--config", "4,8", "--epochs", "1", "--seeds", "1", "--jobs", "1",
                "--no-progress", "--out", "report"],
    "demo": ["demo", "--quick", "--seeds", "1", "--jobs", "1", "--out", "demo"],
    "probe": ["probe", *ECHO, "--epochs", "1", "--max-lag", "4", "--positions", "2", "--png", "probe.png"],
    "check": ["check", "--task", "echo", "--hidden", "4", "--rows", "2", "--steps", "16"],
    "bench": ["bench"],
}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return dict(action.choices)


def test_every_computing_command_takes_threads_with_one_default():
    parsers = subparsers()
    for name in COMMANDS:
        action = parsers[name]._option_string_actions["--threads"]  # noqa: SLF001
        assert action.default == options.DEFAULT_THREADS == 1, name
    # schedule only draws (no torch work): it has no threads to set
    assert "--threads" not in parsers["schedule"]._option_string_actions  # noqa: SLF001
    assert set(parsers) == set(COMMANDS) | {"schedule"}


@pytest.fixture
def no_work(monkeypatch):
    """Every command's work, replaced by a failure: a bad value must stop the command before it."""
    def work(*args, **kwargs):
        raise AssertionError("the command started its work")

    monkeypatch.setattr(Trainer, "fit", work)
    monkeypatch.setattr(sweep, "_execute", work)
    monkeypatch.setattr(check, "check_model", work)
    monkeypatch.setattr(probe, "gradient_vs_lag", work)
    monkeypatch.setattr(bench, "run_suite", work)


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_bad_thread_count_is_an_error_naming_the_flag_before_any_work(name, value, no_work, tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    assert main([*COMMANDS[name], "--threads", value]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert re.search(rf"--threads must be a positive int \(torch threads\); got {value}", err), err
    assert not any(tmp_path.iterdir()) and torch.get_num_threads() == before


@pytest.fixture
def caller_threads():
    """The caller's count, 3, distinct from the 2 the commands are given (and from their default)."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def spy(monkeypatch, owner, name, seen):
    """Record torch's thread count each time ``owner.name`` is called, then call it."""
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


@pytest.mark.parametrize("name", COMMANDS)
def test_a_command_works_with_its_threads_and_gives_the_callers_back(name, caller_threads, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen: list[int] = []
    if name in ("train", "probe"):
        spy(monkeypatch, Trainer, "fit", seen)
    elif name == "check":
        spy(monkeypatch, check, "check_model", seen)
    elif name == "demo":
        real_compare = demo.compare

        def compare(*args, **kwargs):
            # the runs themselves at one thread: two threads cost this shared machine ~7x, and how
            # compare's runs use its threads is the compare case's to check
            seen.extend([torch.get_num_threads(), kwargs["threads"]])
            return real_compare(*args, **{**kwargs, "threads": 1})

        monkeypatch.setattr(demo, "compare", compare)
    elif name == "bench":
        def suite(config, progress=None):
            # the suite's rows set the count themselves, from the config; even a tiny suite takes
            # seconds, so it stops here (with an error the command reports: the count must come back)
            seen.extend([torch.get_num_threads(), config.threads])
            raise ValueError("measured enough")

        monkeypatch.setattr(bench, "run_suite", suite)
    assert main([*COMMANDS[name], "--threads", "2"]) == (2 if name == "bench" else 0)
    if name == "compare":
        # the count each run used, as the run itself read it
        seen += [run["threads"] for run in json.loads((tmp_path / "report" / "results.json").read_text())["runs"]]
    assert seen and set(seen) == {2}
    assert torch.get_num_threads() == caller_threads


def test_the_workers_of_a_compare_run_with_its_threads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", *ECHO, "--config", "4,8", "--config", "2,4", "--epochs", "1", "--seeds", "1",
                 "--jobs", "2", "--no-progress", "--out", "report", "--threads", "2"]) == 0
    runs = json.loads((tmp_path / "report" / "results.json").read_text())["runs"]
    assert len(runs) == 2 and [run["threads"] for run in runs] == [2, 2]


def test_the_thread_count_is_restored_when_the_work_fails(caller_threads):
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == caller_threads
    with pytest.raises(ValueError, match="threads must be a positive int"):
        with torch_threads(0):
            pass
    assert torch.get_num_threads() == caller_threads
