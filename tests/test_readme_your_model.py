"""The README's "Your model" section, run as written: its file written where it says, its Python
run, and every command of its shell block run with the exit status its comment names (0 if none)."""

import re
import shlex
from pathlib import Path

import torch

from tbptt.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_your_model_runs_as_written(tmp_path, monkeypatch, capsys):
    text = section("Your model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the suite's machine is shared: threads only contend here
    try:
        run_section(text, tmp_path, monkeypatch, capsys)
    finally:
        torch.set_num_threads(threads)


def run_section(text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    files = [b for b in blocks(text, "python") if b.startswith("# ") and b.split("\n", 1)[0].endswith(".py")]
    assert [b.split("\n", 1)[0] for b in files] == ["# my_model.py"]
    for block in files:
        (tmp_path / block.split("\n", 1)[0][2:]).write_text(block)
    for block in blocks(text, "python"):
        if block not in files:
            exec(compile(block, "README.md", "exec"), {})
    commands = [line for block in blocks(text, "bash") for line in block.splitlines() if line.strip()]
    assert len(commands) == 4
    for line in commands:
        expected = re.search(r"# exit status (\d+)", line)
        argv = shlex.split(line, comments=True)
        assert argv[0] == "tbptt", line
        assert main(argv[1:]) == (int(expected.group(1)) if expected else 0), line
        out = capsys.readouterr().out
        if expected:  # what the comment quotes is in the report
            quoted = re.search(r'"(.+)"', line.split("#", 1)[1])
            assert quoted is None or quoted.group(1) in " ".join(out.split()), out
    rows = (tmp_path / "my-models" / "results.csv").read_text()
    for label in ("TBPTT(8,8) lstm", "TBPTT(8,8) lru", "TBPTT(8,8) my_model.py:factory"):
        assert label in rows
