"""Every command in the README runs as written, with a small budget added (the options a command
line repeats, the last one counts), and the README's Python examples run with smaller sizes. The
sections "Your model" and "Inside PyTorch Lightning" are run as written by tests of their own."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tbptt import bench
from tbptt.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"

# what each subcommand gets on top of the README's words, so that it finishes in seconds
SMALL = {
    "demo": ["--budget", "cpu:0.05", "--seeds", "1", "--jobs", "1"],
    "compare": ["--budget", "cpu:0.05", "--seeds", "1", "--jobs", "1", "--no-progress"],
    "probe": ["--epochs", "1", "--max-lag", "8", "--positions", "4"],
    "train": ["--budget", "cpu:0.1"],
    "schedule": [],
    "check": [],
    "bench": [],  # the suite itself is swapped for a tiny one below
}
TINY_SUITE = bench.quick_config(batch=3, inputs=3, hidden=5, outputs=2, n=40, k=8, k1=4, k2=12, long_n=40,
                                memory_ns=(24, 72), memory_k2s=(8, 16), repeats=1, warmup=0)


def _commands(text: str) -> list[str]:
    parts = [p.split("  #")[0].strip() for p in text.split("&&")]
    return [re.sub(r"^\.venv/bin/", "", p) for p in parts if re.match(r"^(\.venv/bin/)?(tbptt|torchrun) ", p)]


# sections that a test of their own runs as written
OWN_TESTS = {"Your model": "tests/test_readme_your_model.py", "Inside PyTorch Lightning": "tests/test_lightning.py"}


def readme_text() -> str:
    """The README without the sections ``OWN_TESTS`` names."""
    text = README.read_text()
    for title in OWN_TESTS:
        start = text.find(f"\n## {title}\n")
        if start >= 0:
            end = text.find("\n## ", start + 1)
            text = text[:start] + (text[end:] if end >= 0 else "")
    return text


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks, of its command table's first column, and of the
    install lines written inline."""
    text = readme_text()
    found: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            found += _commands(line)
    for cell in re.findall(r"^\| `([^`]+)` \|", text, re.M):
        found += _commands(cell)
    for span in re.findall(r"`(python3 -m venv [^`]+)`", text):
        found += _commands(span)
    return list(dict.fromkeys(found))


COMMANDS = readme_commands()
_REAL_SUITE = bench.run_suite


def test_the_readme_commands_were_found():
    subcommands = {shlex.split(c)[1] for c in COMMANDS if c.startswith("tbptt ")}
    assert subcommands == set(SMALL)
    assert sum(c.startswith("torchrun ") for c in COMMANDS) == 2


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the commands run their models; the examples are small too
    # the text the README's text command reads: a few thousand characters of prose
    words = "the quick brown fox jumps over the lazy dog while a recurrent network learns to spell ".split()
    (tmp_path / "book.txt").write_text(" ".join(words[i % len(words)] for i in range(1200)))
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    yield tmp_path
    torch.set_num_threads(threads)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("tbptt ")])
def test_a_readme_command_runs_as_written(command, workdir, monkeypatch, capsys):
    argv = shlex.split(command)[1:]
    if argv[0] == "bench":
        monkeypatch.setattr(bench, "run_suite", lambda config, progress=None: _REAL_SUITE(TINY_SUITE))
    assert main(argv + SMALL[argv[0]]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    if argv[0] in ("demo", "compare"):
        assert "which TBPTT(k1, k2)" in out and "Use TBPTT(" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("torchrun ")])
def test_a_readme_torchrun_command_runs_as_written(command, workdir):
    argv = shlex.split(command)[1:]
    sub = argv[argv.index("tbptt") + 1]
    run = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *argv, *SMALL[sub], "--timeout", "60"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=240, cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme_text(), re.S)


# sizes the examples are run at here: the same code on fewer steps and epochs
SHRINK = [("8 * 4001).reshape(8, 4001, 1)", "8 * 401).reshape(8, 401, 1)"), ("range(0, 4000, 100)", "range(0, 400, 100)"),
          ("epochs=30", "epochs=2")]


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_a_readme_python_example_runs(index, workdir, capsys):
    code = _python_blocks()[index]
    for old, new in SHRINK:
        code = code.replace(old, new)
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})  # noqa: S102
    assert capsys.readouterr().out.strip()  # each example prints what it shows
