"""``tbptt train``: one configuration on a task, on one process or on two torchrun ranks."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tbptt.cli import main

SMALL = ["--task", "echo", "--task-option", "steps=60", "--task-option", "eval_steps=30",
         "--task-option", "batch_size=4", "--config", "5,10", "--hidden", "8", "--segment-length", "7"]


def epochs(path):
    return [json.loads(line) for line in open(path)]


def test_train_prints_epochs_and_the_test_metric_against_the_baseline(tmp_path, capsys):
    assert main(["train", *SMALL, "--epochs", "2", "--log", str(tmp_path / "log.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "TBPTT(5,10), recompute, 4 streams" in out
    assert "valid loss" in out and "test accuracy" in out and "the baseline (chance" in out
    assert "updates/s on 1 process" in out
    log = epochs(tmp_path / "log.jsonl")
    assert [e["epoch"] for e in log] == [1, 2] and log[1]["valid_loss"] < log[0]["valid_loss"]


def test_train_takes_the_random_and_adaptive_schedules(tmp_path, capsys):
    small = [a if a != "5,10" else "adaptive:5@every=3,max_k2=20" for a in SMALL]
    assert main(["train", *small, "--epochs", "1"]) == 0
    assert "AdaptiveTBPTT(5,max_k2=20,every=3), recompute" in capsys.readouterr().out


def test_resume_continues_the_run_as_if_never_stopped(tmp_path, capsys):
    straight = tmp_path / "straight.jsonl"
    assert main(["train", *SMALL, "--strategy", "stored", "--epochs", "3", "--log", str(straight)]) == 0
    path = str(tmp_path / "run.pt")
    assert main(["train", *SMALL, "--strategy", "stored", "--epochs", "1", "--checkpoint", path]) == 0
    resumed = tmp_path / "resumed.jsonl"
    assert main(["train", *SMALL, "--strategy", "stored", "--epochs", "3", "--checkpoint", path,
                 "--checkpoint-every", "4", "--resume", "--log", str(resumed)]) == 0
    keys = ("train_loss", "valid_loss", "valid_metric", "updates")
    assert [[e[k] for k in keys] for e in epochs(resumed)] == [[e[k] for k in keys] for e in epochs(straight)]


@pytest.mark.parametrize("args,message", [
    (["--config", "0,5"], "k1 must be a positive int"),
    (["--config", "5,5", "--task-option", "nope=1"], "bad --task-option 'nope=1'.*delay"),
    (["--config", "5,5", "--task-option", "delay=x"], "delay takes an int, e.g. delay=5"),
    (["--config", "5,5", "--task-option", "path=x"], "bad --task-option .path=x.*delay=5"),
    (["--config", "5,5", "--lr", "-1"], "--lr must be a positive number"),
    (["--config", "5,5", "--resume"], "--resume must be given together with --checkpoint"),
    (["--config", "5,5", "--distributed"], "missing RANK.*torchrun --nproc_per_node"),
])
def test_bad_arguments_say_what_is_wrong(args, message, capsys, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert main(["train", "--task", "echo", "--task-option", "steps=20", "--task-option", "eval_steps=10",
                 "--epochs", "1", *args]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert re.search(message, err), err


def test_under_torchrun_two_ranks_train_as_one_process_and_rank_zero_alone_prints(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "tbptt", "train", *SMALL, "--epochs", "2",
               "--log-file", str(tmp_path / "ranks.jsonl"), "--checkpoint", str(tmp_path / "ranks.pt"), "--timeout", "120"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test accuracy") == 1
    assert "4 streams over 2 ranks" in done.stdout and "updates/s on 2 processes" in done.stdout
    assert main(["train", *SMALL, "--epochs", "2", "--log", str(tmp_path / "one.jsonl")]) == 0
    for two, one in zip(epochs(tmp_path / "ranks.jsonl"), epochs(tmp_path / "one.jsonl"), strict=True):
        for key in ("train_loss", "valid_loss"):
            assert two[key] == pytest.approx(one[key], rel=1e-5)
    assert (tmp_path / "ranks.pt").exists()
