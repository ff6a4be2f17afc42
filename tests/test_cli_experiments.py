"""The experiment commands end to end: schedule, compare (parallel, diverging, interrupted), probe, demo."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tbptt import TBPTT
from tbptt.cli import main
from tbptt.experiments import report
from tbptt.experiments.runs import RunSpec, run_one

TINY_ADDING = ["--task", "adding", "--task-option", "sequences=32", "--task-option", "eval_sequences=16",
               "--task-option", "length=10", "--task-option", "batch_size=8"]


def test_schedule_command_prints_the_timeline_and_the_cost(tmp_path, capsys):
    png = tmp_path / "s.png"
    assert main(["schedule", "2", "5", "--n", "10", "--png", str(png), "--width", "40"]) == 0
    out = capsys.readouterr().out
    assert "T=6  ·░░░██····" in out and "T=10 ·····░░░██" in out
    cost = TBPTT(2, 5).cost(10)
    for name, key in (("updates", "updates"), ("forward (recompute)", "forward_recompute"),
                      ("backward", "backward"), ("memory", "max_window")):
        line = next(l for l in out.splitlines() if f" {name} " in l)
        assert f" {cost[key]} " in line
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["schedule", "0", "5"]) == 2
    assert "k1 must be a positive int" in capsys.readouterr().err.replace("\n", " ")


def test_schedule_takes_k1_k2_as_one_argument_and_creates_the_png_folder(tmp_path, capsys):
    png = tmp_path / "new" / "folder" / "s.png"
    assert main(["schedule", "2,5", "--n", "10", "--width", "40", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "TBPTT(2,5) on n=10" in out and "T=6  ·░░░██····" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["schedule", "3"]) == 2
    assert "K1 K2 or K1,K2" in " ".join(capsys.readouterr().err.split())
    assert main(["schedule", "2", "5", "--width", "0"]) == 2
    assert "--width must be a positive" in " ".join(capsys.readouterr().err.split())


def test_boolean_task_options_are_read_as_booleans_by_one_helper():
    from tbptt.commands import compare, probe, train

    assert compare.task_options("co2", ["difference=false"]) == {"difference": False}
    assert compare.task_options("sunspots", ["difference=True", "batch_size=2"]) == {"difference": True,
                                                                                    "batch_size": 2}
    with pytest.raises(ValueError, match="difference takes true or false"):
        compare.task_options("co2", ["difference=maybe"])
    assert probe.load_task is compare.load_task and train.load_task is compare.load_task


TINY_ECHO = ["--task", "echo", "--task-option", "steps=20", "--task-option", "eval_steps=12", "--epochs", "1"]


@pytest.mark.parametrize("args,message", [
    (["probe", *TINY_ECHO, "--max-lag", "4", "--fraction", "2"], r"--fraction must be a number in \(0, 1\)"),
    (["probe", *TINY_ECHO, "--max-lag", "4", "--fraction", "0"], r"--fraction must be a number in \(0, 1\)"),
    (["probe", *TINY_ECHO, "--positions", "0"], "--positions must be a positive int"),
    (["probe", *TINY_ECHO, "--clip", "-1"], "--clip must be a number >= 0"),
    (["probe", *TINY_ECHO, "--epochs", "0"], "--epochs must be a positive int"),
    (["probe", *TINY_ECHO, "--rows", "0"], "--rows must be a positive int"),
    (["probe", *TINY_ECHO, "--max-lag", "0"], "--max-lag must be a positive int"),
    (["probe", "--task", "text"], "pass --task-option path=FILE"),
    (["probe", "--task", "text", "--task-option", "path=/no/such/file.txt"], "cannot read /no/such/file.txt"),
    (["demo", "--seeds", "0"], "--seeds must be a positive int"),
    (["demo", "--jobs", "0"], "--jobs must be a positive int"),
    (["compare", *TINY_ECHO, "--config", "5,5", "--clip", "-1"], "--clip must be a number >= 0"),
    (["compare", *TINY_ECHO, "--config", "5,5", "--hidden", "0"], "--hidden must be a positive int"),
    (["compare", *TINY_ECHO, "--config", "5,5", "--segment-length", "0"], "--segment-length must be a positive int"),
    (["compare", *TINY_ECHO, "--config", "5,5", "--max-seconds", "-1"], "--max-seconds must be a positive number"),
    (["compare", *TINY_ECHO, "--config", "5,5", "--timeout", "0"], "--timeout must be a positive number"),
    (["compare", *TINY_ECHO, "--config", "5,5", "--distributed"], "missing RANK.*torchrun --nproc_per_node"),
    (["compare", "--task", "text", "--config", "5,5"], "pass --task-option path=FILE"),
    (["compare", "--task", "text", "--task-option", "path=/no/such/file.txt", "--config", "5,5"],
     "cannot read /no/such/file.txt"),
    (["compare", "--task", "co2", "--task-option", "difference=maybe", "--config", "5,5"],
     "difference takes true or false"),
    (["train", "--task", "text", "--config", "5,5"], "pass --task-option path=FILE"),
])
def test_bad_arguments_are_errors_before_any_work(args, message, capsys, monkeypatch, tmp_path):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were, not into the repository
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert re.search(message, err), err
    assert not any(tmp_path.iterdir())


def test_compare_end_to_end_with_a_diverging_configuration(tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["compare", *TINY_ADDING, "--config", "5,5", "--config", "2,10", "--config", "5,5@lr=1e25",
                 "--seeds", "2", "--epochs", "2", "--jobs", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "adding: skill" in printed and "report:" in printed
    # not a terminal (a log): every table at its full width, no cell cut, and a line per finished run
    assert "…" not in printed and "train CPU s" in printed and "bwd steps" in printed and "steps/s" in printed
    assert all(len(line) < 1000 for line in printed.splitlines())
    assert "done 6/6: TBPTT(" in printed and printed.index("which TBPTT(k1, k2)") < printed.index("adding: skill")
    data = json.loads((out / "results.json").read_text())
    rows = {r["config"]: r for r in data["summary"]}
    assert set(rows) == {"TBPTT(5,5)", "TBPTT(2,10)", "TBPTT(5,5) lr=1e+25"}
    assert rows["TBPTT(5,5) lr=1e+25"]["diverged"] == 2
    assert rows["TBPTT(5,5)"]["diverged"] == 0 and rows["TBPTT(2,10)"]["diverged"] == 0
    assert all(r["status"] != "failed" for r in data["runs"]) and len(data["runs"]) == 6
    # forward and backward steps from the schedule: 2 epochs of 40-step streams
    assert rows["TBPTT(2,10)"]["backward_steps"] == 2 * TBPTT(2, 10).cost(40)["backward"]
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4


def test_compare_rejects_a_bad_configuration(capsys):
    assert main(["compare", *TINY_ADDING, "--config", "5,x", "--no-progress"]) == 2
    assert "5,x" in capsys.readouterr().err


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` is alive (a zombie waiting to be reaped is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_ctrl_c_stops_the_workers_and_keeps_the_runs_that_finished(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # one run that takes long, TBPTT(1,n) on 300-step streams, and a short one that finishes first
    proc = subprocess.Popen(
        [sys.executable, "-m", "tbptt", "compare", "--task", "echo", "--task-option", "steps=300",
         "--task-option", "batch_size=4", "--config", "1,n", "--config", "50,50", "--seeds", "1",
         "--epochs", "30", "--jobs", "2", "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (out / "results.json").exists():
            time.sleep(0.2)
        assert (out / "results.json").exists(), proc.stderr.read1().decode() if proc.poll() is not None else "timeout"
        workers = children(proc.pid)
        proc.send_signal(signal.SIGINT)  # to the parent only: it must stop its workers itself
        stdout, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["interrupted"] is True
    assert [r["config"] for r in data["runs"]] == ["TBPTT(50,50)"]
    # the workers are gone; the resource tracker may take a moment to notice its parent left
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workers and not any(running(pid) for pid in workers)
    assert (out / "report.html").exists() and b"interrupted" in stdout
    # the run that finished in a worker process is the run this process makes from the same seed
    spec = RunSpec(task="echo", config="50,50", seed=0, epochs=30,
                   task_options=(("batch_size", 4), ("steps", 300)))
    here = run_one(spec)
    there = data["runs"][0]
    assert here["final_metric"] == there["final_metric"]
    assert json.loads(json.dumps(report._json_safe(here["grad_norms"]))) == there["grad_norms"]


def test_probe_command(tmp_path, capsys, monkeypatch):
    from tbptt import diagnostics

    measured = []

    def known_curve(*args, **kwargs):  # a curve with a known answer; the probe itself is tested in test_diagnostics
        measured.append(kwargs["max_lag"])
        return diagnostics.LagProfile(list(range(1, 9)), [1.0, 0.5, 0.25, 0.01, 0.001, 0.0, 0.0, 0.0], 6)

    from tbptt.commands import probe

    monkeypatch.setattr(probe, "gradient_vs_lag", known_curve)
    png = tmp_path / "plots" / "probe.png"
    code = main(["probe", "--task", "echo", "--task-option", "steps=40", "--task-option", "eval_steps=30",
                 "--task-option", "batch_size=4", "--max-lag", "8", "--positions", "6", "--epochs", "1",
                 "--png", str(png)])
    assert code == 0 and measured == [8, 8]
    out = " ".join(capsys.readouterr().out.split())
    assert "untrained" in out and "trained" in out and "lag 8" in out
    # dropped from k2 = 4 on: 0.011 <= 1% of 1.761; k2 = 3 would drop 0.261
    assert "use k2 = 4 (the trained model's): a window of 4 steps keeps lags 1..3" in out
    assert "the untrained model's k2 = 4 is a lower bound" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_the_probe_says_which_recommendation_applies_and_why():
    from types import SimpleNamespace

    from tbptt.commands.probe import which_applies
    from tbptt.diagnostics import LagProfile

    def curve(ratio):  # a geometric decay, ratio per lag, over 40 lags
        return LagProfile(list(range(1, 41)), [ratio ** lag for lag in range(1, 41)], 8)

    task = SimpleNamespace(baseline={"valid": 0.2}, higher_is_better=True, dependency=5)
    slow, fast = curve(0.85), curve(0.6)
    text = " ".join(which_applies({"untrained": fast, "trained": slow}, 0.01, 40, task, 0.5))
    k2, start = slow.recommend_k2(0.01), fast.recommend_k2(0.01)
    assert start < k2 and f"use k2 = {k2} (the trained model's)" in text
    assert f"the untrained model's k2 = {start} is a lower bound" in text and "known dependency: 5 steps" in text
    text = " ".join(which_applies({"untrained": slow, "trained": fast}, 0.01, 40, task, 0.1))
    assert "training shortened" in text and "does not beat the baseline yet" in text
    growing = LagProfile(list(range(1, 41)), [1.1 ** lag for lag in range(1, 41)], 8)
    assert "exploding" in " ".join(which_applies({"untrained": fast, "trained": growing}, 0.01, 40, task, 0.5))


def test_a_log_gets_a_progress_line_every_few_seconds():
    from rich.console import Console

    from tbptt.experiments.progress import SweepProgress

    now = [0.0]
    console = Console(file=__import__("io").StringIO(), width=1000, force_terminal=False)
    with SweepProgress(True, 4, {0: "TBPTT(5,5) seed 0", 1: "TBPTT(2,8) seed 0"}, console, every=5.0,
                       now=lambda: now[0]) as bar:
        bar.event(("started", 0))
        now[0] = 2.0
        bar.event(("progress", 0, {"epoch": 3, "loss": 0.5, "done": 0.5, "left": "1.5 CPU s of training"}))
        assert console.file.getvalue() == ""  # under 5 s since the start: nothing yet
        now[0] = 6.0
        bar.tick()
        bar.run_done(0, "TBPTT(5,5) seed 0 ok")
        now[0] = 12.0
        bar.tick()
    lines = console.file.getvalue().splitlines()
    assert lines[0] == ("[6 s] runs done 0/4; running: TBPTT(5,5) seed 0 (epoch 3, loss 0.5, 1.5 CPU s of "
                        "training left); about 42 s left")  # 1/8 of the sweep in 6 s
    assert lines[1] == "[6 s] done 1/4: TBPTT(5,5) seed 0 ok"
    assert lines[2] == "[12 s] runs done 1/4; about 36 s left" and len(lines) == 3


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--jobs", "1", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "k2 > d = 2" in out and "demo finished" in out and "which TBPTT(k1, k2)" in out
    assert (tmp_path / "index.html").exists() and (tmp_path / "echo" / "report.html").exists()


def test_compare_whose_seeds_diverge_at_different_epochs_writes_the_report(tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["compare", *TINY_ADDING, "--config", "5,5", "--config", "5,5@lr=10", "--optimizer", "sgd",
                 "--clip", "0", "--seeds", "2", "--epochs", "4", "--jobs", "1", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    updates = {r["seed"]: r["updates"] for r in data["runs"] if r["config"] == "TBPTT(5,5) lr=10"}
    assert len(set(updates.values())) == 2  # the seeds diverged after different numbers of updates
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "Figure missing" not in page


def test_the_dependency_verdict_tells_learning_the_delay_from_beating_chance():
    from tbptt.experiments.answer import dependency_lines

    def row(config, k2, metric, updates):
        return {"config": config, "strategy": "recompute", "k2": k2, "final_metric": metric, "updates": updates}

    rows = [row("TBPTT(n,n)", None, 0.343, 30.0), row("TBPTT(4,12)", 12, 0.9, 390.0),
            row("TBPTT(5,5)", 5, 0.21, 300.0), row("TBPTT(12,4) lr=0.1", 4, 0.6, 120.0)]
    meta = {"dependency": 5, "baseline": 0.128, "higher_is_better": True, "metric_name": "accuracy"}
    text = "\n".join(dependency_lines(rows, meta))
    assert "final accuracy > 0.564 (halfway from the baseline 0.128" in text
    spans, short = text.splitlines()[1:3]
    assert spans.startswith("  k2 > d = 5") and "TBPTT(4,12) 0.9 learnt" in spans
    assert "TBPTT(n,n) 0.343 not yet, 30 updates" in spans
    assert short.startswith("  k2 <= d = 5") and "TBPTT(5,5) 0.21 did not" in short
    assert "TBPTT(12,4) lr=0.1 0.6 learnt, though k2 <= d" in short
    assert "fewer updates" in text and "never links an output to the input 5 steps back" in text
    assert dependency_lines(rows, {**meta, "dependency": None}) == []


def test_schedule_draws_artbp_windows_and_says_why_it_cannot_draw_adaptive_ones(capsys):
    from tbptt import ARTBP
    from tbptt.experiments.timeline import drawn_updates

    assert main(["schedule", "artbp:3,6", "--n", "30", "--seed", "1", "--width", "40"]) == 0
    out = capsys.readouterr().out
    assert "ARTBP(3,6) (one draw, seed 1) on n=30" in out
    windows = {u.window for u in drawn_updates(ARTBP(3, 6), 30, seed=1)}
    assert len(windows) > 2 and min(windows) == 3  # L = k1 + J, J drawn per update
    assert drawn_updates(ARTBP(3, 6), 30, seed=1) != drawn_updates(ARTBP(3, 6), 30, seed=2)
    assert main(["schedule", "adaptive:3"]) == 2
    assert "chooses k2 from the gradients measured in training" in " ".join(capsys.readouterr().err.split())
    assert main(["schedule", "artbp:3,2"]) == 2
    assert "mean_k2 must be a number >= k1 = 3" in " ".join(capsys.readouterr().err.split())


def test_compare_runs_artbp_and_adaptive_configurations_and_plots_their_windows(tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["compare", *TINY_ADDING, "--config", "artbp:2,5", "--config", "adaptive:2@every=4,max_k2=12",
                 "--seeds", "1", "--epochs", "2", "--jobs", "1", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    rows = {r["config"]: r for r in data["summary"]}
    assert set(rows) == {"ARTBP(2,5)", "AdaptiveTBPTT(2,max_k2=12,every=4)"}
    runs = {r["config"]: r for r in data["runs"]}
    assert len(set(runs["ARTBP(2,5)"]["update_k2"])) > 2 and 3 < rows["ARTBP(2,5)"]["mean_k2"] < 8
    adaptive = runs["AdaptiveTBPTT(2,max_k2=12,every=4)"]
    assert adaptive["update_k2"][0] == 2 and adaptive["measure_steps"] > 0 and adaptive["measure_time"] > 0
    assert (out / "k2.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 5


@pytest.mark.parametrize("config,message", [
    ("artbp:10,5", "mean_k2 must be a number >= k1 = 10"),
    ("adaptive:5@tolerance=2", r"tolerance must be a number in \(0, 1\)"),
    ("5,5@tolerance=0.1", "belong to an adaptive schedule"),
    ("adaptive:5@every=x", "bad value for every"),
])
def test_bad_schedules_in_a_configuration_are_errors_before_any_work(config, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", *TINY_ECHO, "--config", config]) == 2
    assert re.search(message, " ".join(capsys.readouterr().err.split()))
    assert main(["demo", "--config", config]) == 2
    assert re.search(message, " ".join(capsys.readouterr().err.split()))
    assert not any(tmp_path.iterdir())


def test_demo_runs_extra_configurations_next_to_its_own(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--jobs", "1", "--seeds", "1",
                 "--config", "artbp:3,5"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "ARTBP(3,5)" in out and "demo finished" in out
    assert "ARTBP(3,5) 0." in out.split("k2 > d = 2")[1].split("k2 <= d")[0]  # its windows reach any lag


def test_random_windows_reach_the_dependency_whatever_their_mean():
    """ARTBP's windows are drawn per update: one whose mean is below d still reaches d steps back
    (with a probability its compensation makes up for), so it is filed with the windows that span d."""
    from tbptt.experiments.answer import dependency_lines, reaches

    rows = [{"config": "ARTBP(2,4)", "strategy": "recompute", "k1": 2, "k2": 4, "windows": "random",
             "final_metric": 0.3, "updates": 100.0},
            {"config": "TBPTT(2,4)", "strategy": "recompute", "k1": 2, "k2": 4, "windows": "fixed",
             "final_metric": 0.2, "updates": 100.0}]
    assert reaches(rows[0], 5) and not reaches(rows[1], 5)
    meta = {"dependency": 5, "baseline": 0.128, "higher_is_better": True, "metric_name": "accuracy"}
    spans, short = "\n".join(dependency_lines(rows, meta)).splitlines()[1:3]
    assert "ARTBP(2,4) 0.3" in spans and "TBPTT(2,4) 0.2 did not" in short
