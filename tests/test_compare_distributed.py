"""`tbptt compare` spread over torchrun's ranks equals the same sweep in one process."""

import json
import os
import socket
import subprocess
import sys

from tbptt.cli import main

TINY = ["--task", "adding", "--task-option", "sequences=32", "--task-option", "eval_sequences=16",
        "--task-option", "length=10", "--task-option", "batch_size=8", "--epochs", "2", "--seeds", "2",
        "--config", "5,5", "--config", "2,10", "--config", "10,3", "--jobs", "1", "--no-progress"]


def results(folder):
    data = json.loads((folder / "results.json").read_text())
    return sorted((r["config"], r["seed"], r["final_metric"]) for r in data["runs"])


def test_two_ranks_share_the_runs_and_rank_zero_reports_them_all(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "tbptt", "compare", *TINY, "--out", str(tmp_path / "ranks"),
               "--timeout", "60"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("report:") == 1  # rank 0 alone prints
    assert main(["compare", *TINY, "--out", str(tmp_path / "one")]) == 0
    spread, alone = results(tmp_path / "ranks"), results(tmp_path / "one")
    assert len(spread) == 6 and spread == alone
    assert (tmp_path / "ranks" / "report.html").exists()
