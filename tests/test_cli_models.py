"""--model in the commands (train, compare, probe, check), per-configuration models in compare, the
check command and train --check-model, and the errors a user's model file gets before any work."""

import json
import pickle
import re
import textwrap

import pytest

from tbptt.cli import main
from tbptt.experiments import runs
from tbptt.experiments.sweep import compare
from tbptt.models import MODELS
from _model_loops import one_thread

ECHO = ["--task", "echo", "--task-option", "steps=40", "--task-option", "eval_steps=20",
        "--task-option", "batch_size=4", "--hidden", "6", "--epochs", "1"]
ECHO_OPTIONS = {"steps": 40, "eval_steps": 20, "batch_size": 4}

FILE = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, n_inputs, n_outputs, hidden, batch_first=True):
        super().__init__()
        self.rnn = nn.GRU(n_inputs, hidden, batch_first=batch_first)
        self.head = nn.Linear(hidden, n_outputs)
    def forward(self, x, state=None):
        out, state = self.rnn(x, state)
        return self.head(out), state

def factory(n_inputs, n_outputs, hidden):
    return Net(n_inputs, n_outputs, hidden)

def time_first(n_inputs, n_outputs, hidden):
    return Net(n_inputs, n_outputs, hidden, batch_first=False)

def sizes(n_inputs, n_outputs, hidden):
    return torch.zeros(n_inputs, n_outputs)
'''


_threads = pytest.fixture(autouse=True)(one_thread)  # tiny models: one thread


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(textwrap.dedent(FILE))
    return path


def err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_configurations_name_their_model():
    c = runs.Configuration.parse("10,40@model=lru,lr=0.1")
    assert (c.model, c.lr, str(c)) == ("lru", 0.1, "TBPTT(10,40) lr=0.1 lru")
    assert runs.Configuration.parse("5,5@model=dir/m.py:make").model == "dir/m.py:make"
    with pytest.raises(ValueError, match=r"model \(in configuration '5,5@model=rwkv'\) must be one of 'lstm'"):
        runs.Configuration.parse("5,5@model=rwkv")
    assert runs.with_model("5,5", "gru") == "5,5@model=gru"
    assert runs.with_model("5,5@lr=1", "gru") == "5,5@lr=1,model=gru"
    assert runs.with_model("5,5@model=lru", "gru") == "5,5@model=lru"
    spec = runs.RunSpec(task="echo", config="5,5@model=mamba", model="gru")
    assert pickle.loads(pickle.dumps(spec)).settings()["model"] == "mamba"
    assert runs.RunSpec(task="echo", config="5,5", model="gru").settings()["model"] == "gru"


def test_compare_labels_show_the_model_when_configurations_differ_by_model():
    both = compare("echo", ["5,5", "5,5@model=mingru"], 1, epochs=1, hidden=6, jobs=1,
                   task_options=ECHO_OPTIONS, progress=False)
    assert [r["config"] for r in both.rows] == ["TBPTT(5,5) lstm", "TBPTT(5,5) mingru"]
    assert [r["model"] for r in both.runs] == ["lstm", "mingru"]
    assert all(r["status"] == "ok" for r in both.runs)
    same = compare("echo", ["5,5", "2,4"], 1, epochs=1, hidden=6, jobs=1, model="mingru",
                   task_options=ECHO_OPTIONS, progress=False)
    assert [r["config"] for r in same.rows] == ["TBPTT(5,5)", "TBPTT(2,4)"]
    assert [r["model"] for r in same.runs] == ["mingru", "mingru"]


def test_train_and_probe_take_any_model(tmp_path, capsys, model_file):
    assert main(["train", *ECHO, "--config", "5,5", "--model", "mamba"]) == 0
    assert "mamba, TBPTT(5,5), recompute, 4 streams" in " ".join(capsys.readouterr().out.split())
    assert main(["train", *ECHO, "--config", "5,5", "--cell", "gru"]) == 0  # the former name
    assert "gru, TBPTT(5,5)" in " ".join(capsys.readouterr().out.split())
    assert main(["train", *ECHO, "--config", "5,5", "--model", f"{model_file}:factory", "--check-model"]) == 0
    png = tmp_path / "probe.png"
    assert main(["probe", *ECHO, "--model", "lru", "--max-lag", "4", "--positions", "4", "--png", str(png)]) == 0
    assert "echo, lru: gradient norm against lag" in capsys.readouterr().out and png.exists()


def test_train_check_model_stops_a_broken_model_before_any_update(tmp_path, capsys, model_file):
    log = tmp_path / "log.jsonl"
    assert main(["train", *ECHO, "--config", "5,5", "--model", f"{model_file}:time_first", "--check-model",
                 "--log", str(log)]) == 2
    out = capsys.readouterr()
    assert "check_model: TokenEmbedding on inputs (4, 40) int64" in out.out and "problems:" in out.out
    assert "nn.GRU(..., batch_first=True)" in " ".join(out.out.split())
    assert "breaks the engine's contract (report above)" in " ".join(out.err.split())
    assert not log.exists()


def test_check_command(capsys, model_file):
    for name in MODELS:
        assert main(["check", "--model", name]) == 0, name
        assert "keeps the engine's contract" in capsys.readouterr().out
    assert main(["check", "--model", "lru", "--task", "adding", "--rows", "2", "--steps", "16"]) == 0
    assert "inputs (2, 16, 2) float32" in capsys.readouterr().out
    assert main(["check", "--model", f"{model_file}:factory"]) == 0
    assert main(["check", "--model", f"{model_file}:time_first"]) == 1
    assert "dim 1 follows the number of steps" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv,message", [
    (["check", "--model", "rwkv"], r"--model must be one of 'lstm', .* or 'path/to/file.py:factory'; got 'rwkv'"),
    (["check", "--model", "lru", "--steps", "4"], "the checks need a sample of at least 8"),
    (["check", "--model", "lru", "--rows", "0"], "--rows must be a positive int"),
    (["train", *ECHO, "--config", "5,5", "--model", "nothere.py:make"], "there is no file nothere.py"),
    (["train", *ECHO, "--config", "5,5", "--model", "{file}:nope"], r"user_model.py defines no 'nope' \(it defines: Net"),
    (["train", *ECHO, "--config", "5,5", "--model", "{file}:sizes"], "user_model.py:sizes returned a Tensor"),
    (["compare", *ECHO, "--config", "5,5", "--config", "5,5@model=nothere.py:make", "--out", "{out}"],
     "there is no file nothere.py"),
    (["compare", *ECHO, "--config", "5,5@model={file}:sizes", "--out", "{out}"], "user_model.py:sizes returned a Tensor"),
    (["compare", *ECHO, "--config", "5,5@model=rwkv", "--out", "{out}"], r"model \(in configuration '5,5@model=rwkv'\)"),
    (["probe", *ECHO, "--max-lag", "4", "--model", "{file}:sizes"], "user_model.py:sizes returned a Tensor"),
])
def test_a_bad_model_is_an_error_before_any_work(argv, message, capsys, tmp_path, model_file):
    out = tmp_path / "report"
    argv = [a.format(file=model_file, out=out) for a in argv]
    assert main(argv) == 2
    assert re.search(message, err(capsys))
    assert not out.exists()  # no run started, no report written


def test_a_compare_report_keeps_each_runs_model(tmp_path, model_file):
    out = tmp_path / "report"
    assert main(["compare", *ECHO, "--config", "4,4", "--config", f"4,4@model={model_file}:factory",
                 "--seeds", "1", "--jobs", "1", "--no-progress", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in data["runs"]] == ["lstm", f"{model_file}:factory"]
    assert [r["config"] for r in data["summary"]] == ["TBPTT(4,4) lstm", f"TBPTT(4,4) {model_file}:factory"]
    assert data["meta"]["settings"]["model"] == "lstm"
