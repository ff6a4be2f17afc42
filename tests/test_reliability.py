"""Nothing lost, nothing silently wrong (issue 13): checkpoint integrity, weights that stay finite, the
optimizer and the model, bounded histories and checkpoints, tampered or mismatched checkpoints,
output paths checked first, graph memory estimated first, errors that say what to change."""

import ast
import copy
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tbptt
from tbptt import checkpoint as ckpt
from tbptt.cli import main
from tbptt.files import atomic_write
from tbptt.memory import GraphMemoryError, graph_bytes_per_step
from _models import make_data, make_model, mse_steps


def new_trainer(k1=3, k2=6, strategy="stored", model=None, lr=0.01, **kwargs):
    model = model or make_model("lstm", 0)
    return tbptt.Trainer(model, mse_steps, torch.optim.Adam(model.parameters(), lr=lr), tbptt.TBPTT(k1, k2),
                         strategy=strategy, **kwargs)


def snapshot(trainer):
    return ({k: v.clone() for k, v in trainer.model.state_dict().items()}, copy.deepcopy(trainer.optimizer.state_dict()))


def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# ----------------------------------------------------------------------------------------------
# 1. checkpoint integrity
def test_a_flipped_byte_anywhere_in_a_checkpoint_is_a_checkpoint_error(tmp_path):
    x, y = make_data(0, 2, 30)
    trainer = new_trainer()
    path = tmp_path / "c.pt"
    trainer.fit((x, y), epochs=1, segment_length=4, checkpoint=path, checkpoint_every=3)
    good = path.read_bytes()
    middle = len(good) // 2
    bad = bytearray(good)
    for i in range(middle, middle + 64):  # the attack of the issue: 64 bytes in the middle
        bad[i] ^= 0xFF
    path.write_bytes(bytes(bad))
    with pytest.raises(tbptt.CheckpointError, match="corrupt: its content does not match the SHA-256"):
        trainer.fit((x, y), epochs=2, segment_length=4, checkpoint=path, resume=True)
    path.write_bytes(good[: len(good) - 10])
    with pytest.raises(tbptt.CheckpointError, match="truncated or corrupt"):
        ckpt.load(path)


# ----------------------------------------------------------------------------------------------
# 2. weights that stay finite after each optimizer step
def momentum_trainer(momentum=0.9, **kwargs):
    model = make_model("lstm", 0).float()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=momentum)
    return tbptt.Trainer(model, mse_steps, optimizer, tbptt.TBPTT(4, 4), **kwargs)


# momentum 0: plain SGD, whose steps are checked before they are taken (a bound proves most safe)
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_a_step_that_makes_the_weights_non_finite_is_undone_weights_and_optimizer_state(tmp_path, momentum):
    trainer = momentum_trainer(momentum)
    x, y = make_data(0, 2, 12, dtype=torch.float32)
    (first,) = trainer.train_on(x[:, :4], y[:, :4] * 100)
    assert not first.skipped
    before = snapshot(trainer)
    trainer.optimizer.param_groups[0]["lr"] = 1e38  # a scheduler gone wrong: finite gradient, infinite step
    (record,) = trainer.train_on(x[:, 4:8], y[:, 4:8] * 100)
    assert record.skipped and record.reason == "non-finite weights after the optimizer step"
    assert math_finite(record.loss) and math_finite(record.grad_norm)
    after = snapshot(trainer)
    assert same(before[0], after[0]) and same(before[1]["state"], after[1]["state"])
    assert trainer.updates_skipped == 1 and trainer.updates_applied == 1
    trainer.optimizer.param_groups[0]["lr"] = 0.01
    (record,) = trainer.train_on(x[:, 8:], y[:, 8:])
    assert not record.skipped and all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_a_first_step_that_overflows_leaves_no_optimizer_state_and_can_raise(momentum):
    trainer = momentum_trainer(momentum, nonfinite="raise")
    trainer.optimizer.param_groups[0]["lr"] = 1e38
    x, y = make_data(0, 2, 4, dtype=torch.float32)
    before = snapshot(trainer)
    with pytest.raises(tbptt.NonFiniteError, match="non-finite weights.*stream step 4.*undone"):
        trainer.train_on(x, y * 100)
    after = snapshot(trainer)
    assert same(before[0], after[0]) and after[1]["state"] == {}


def test_a_learning_rate_the_weights_cannot_hold_is_refused_by_name():
    model = make_model("lstm", 0).float()
    with pytest.raises(tbptt.InvalidArgument, match=r"lr must be a finite number that float32 weights can hold"):
        tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=1e308), tbptt.TBPTT(2, 2))
    trainer = momentum_trainer()  # and a step that overflows anyway (lr raised later) is undone
    trainer.optimizer.param_groups[0]["lr"] = 1e308
    x, y = make_data(0, 2, 4, dtype=torch.float32)
    (record,) = trainer.train_on(x, y)
    assert record.skipped and "overflowed" in record.reason


@pytest.mark.parametrize("clip", [None, 1.0])
def test_plain_sgd_never_steps_on_a_refused_update_and_its_bound_covers_every_step_taken(clip):
    """Plain SGD's steps are taken without copies when a bound proves them safe: a non-finite
    gradient is refused before any step, and weights grown close to the dtype's largest make the
    bound refuse, so that the step is checked (and undone) as with any optimizer."""
    from tbptt.safestep import sgd_step_bound

    trainer = momentum_trainer(0.0, clip_grad_norm=clip)
    x, y = make_data(0, 2, 16, dtype=torch.float32)
    assert not trainer.train_on(x[:, :4], y[:, :4])[0].skipped
    bound = trainer._undo.bound
    norm = torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in trainer.model.parameters()]))
    assert bound is not None and bound >= float(norm)  # the bound holds after a step taken without copies
    before = snapshot(trainer)
    bad = x[:, 4:8].clone()
    bad[0, 1, 0] = float("nan")
    (record,) = trainer.train_on(bad, y[:, 4:8])
    assert record.skipped and record.reason in ("non-finite loss", "non-finite gradient")
    assert same(before[0], snapshot(trainer)[0])
    with torch.no_grad():  # weights changed between calls (a load, an edit): the bound is measured again
        for p in trainer.model.parameters():
            p.mul_(1000)
    trainer.train_on(x[:, 12:], y[:, 12:])
    weights = torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in trainer.model.parameters()]))
    assert trainer._undo.bound is None or trainer._undo.bound >= float(weights)
    params = list(trainer.model.parameters())
    undo = trainer._undo
    largest = torch.finfo(torch.float32).max
    undo.bound = largest / 8  # weights near the dtype's largest: a step that could overflow is not taken bare
    assert not undo.take_bounded_step(1.0, largest / 8, params) and undo.bound is None
    assert undo.take_bounded_step(0.01, 1.0, params) and undo.bound >= float(norm)
    assert sgd_step_bound(1.0, 2.0, 3.0) > 7.0  # each element within the norms, and a margin


def math_finite(v):
    return v == v and abs(v) != float("inf")


# ----------------------------------------------------------------------------------------------
# 4. bounded checkpoints and history
def long_fit(tmp_path, steps, name, **options):
    torch.manual_seed(0)
    model = tbptt.RecurrentNet(1, 2, 1)
    trainer = tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=0.01), tbptt.TBPTT(1, 1))
    x = torch.randn(1, steps, 1)
    path = tmp_path / f"{name}.pt"
    history = trainer.fit((x, x), epochs=1, segment_length=steps // 2, checkpoint=path, checkpoint_every=1,
                          **options)
    return history, path


def test_checkpoint_and_history_do_not_grow_with_the_number_of_updates(tmp_path):
    short, short_path = long_fit(tmp_path, 100, "short")
    long, long_path = long_fit(tmp_path, 1000, "long")
    assert long.totals.updates == 1000 and short.totals.updates == 100
    # the saved streams are a segment longer, and the gradient norms' histogram holds a few more bins
    grown = long_path.stat().st_size - short_path.stat().st_size
    assert grown < 6000, f"checkpoint grew by {grown} bytes over 900 more updates"
    assert abs(len(repr(long.state_dict())) - len(repr(short.state_dict()))) < 4000
    with pytest.raises(AttributeError, match="keep_updates=True"):
        long.updates
    kept, _ = long_fit(tmp_path, 100, "kept", keep_updates=True)
    assert len(kept.updates) == 100 and kept.epochs[0]["updates"] == 100
    norms = sorted(r.grad_norm for r in kept.updates)
    median = (norms[49] + norms[50]) / 2
    assert kept.epochs[0]["grad_norm_median"] == pytest.approx(median, rel=0.011)
    assert kept.epochs[0]["grad_norm_max"] == max(norms)


# ----------------------------------------------------------------------------------------------
# 5. tampered and mismatched checkpoints
class Stop(Exception):
    pass


class StopAt:
    """Stops a fit at the first update at or past stream step ``step`` (mid-block when k1 does not divide it)."""

    def __init__(self, step):
        self.step = step

    def on_update(self, trainer, record):
        if record.stop >= self.step:
            raise Stop()


def saved_run(tmp_path):
    x, y = make_data(0, 2, 30)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False
    path = tmp_path / "c.pt"
    with pytest.raises(Stop):
        new_trainer().fit((x, y, mask), epochs=2, segment_length=4, checkpoint=path, checkpoint_every=2,
                          callbacks=[StopAt(15)])
    return (x, y, mask), path


def rehash(saved, path):
    """Write ``saved`` as a checkpoint with a valid hash, even one ``ckpt.save`` would refuse."""
    payload = {k: v for k, v in saved.items() if k not in ("format", "version")}
    atomic_write(path, lambda f: ckpt._write(payload, f))


TAMPERS = [
    ("engine.position", lambda d: d["engine"].update(position=-3), r"engine\.position must be an int >= 0"),
    ("engine.previous", lambda d: d["engine"].update(previous=d["engine"]["position"] + 5), r"engine\.previous must be an int .*<= "),
    ("engine.chunks", lambda d: d["engine"].pop("chunks"), r"engine\.chunks is missing"),
    ("engine.chunks[0].start", lambda d: d["engine"].update(chunks=[(99,) + tuple(c[1:]) for c in d["engine"]["chunks"]]),
     r"engine\.chunks\[0\]\.start"),
    ("engine.states", lambda d: d["engine"].update(states={}), r"engine\.states lacks the state"),
    ("engine.segments[0].weights", lambda d: d["engine"]["segments"][0].update(weights=7), r"engine\.segments\[0\]\.weights"),
    ("engine.batch_size", lambda d: d["engine"].update(batch_size="2"), r"engine\.batch_size must be an int"),
    ("trainer.updates_applied", lambda d: d["trainer"].update(updates_applied="3"), r"trainer\.updates_applied"),
    ("fit.piece", lambda d: d["fit"].update(piece=1000), r"fit\.piece must be an int >= 0 and <= 8"),
    ("fit.epoch", lambda d: d["fit"].update(epoch=None), r"fit\.epoch must be an int"),
    ("history.epochs", lambda d: d["history"].update(epochs="none"), r"history\.epochs must be a list"),
    ("history.totals", lambda d: d["history"]["totals"].update(skipped=10**6), r"history\.totals\.skipped"),
    ("rng.torch", lambda d: d["rng"].update(torch=torch.zeros(3)), r"rng\.torch"),
    ("optimizer.state", lambda d: d["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)), r"optimizer\.state\[0\]\['exp_avg'\]"),
    ("model", lambda d: d["model"].update({"head.bias": torch.full((2,), float("nan"), dtype=torch.float64)}),
     r"model\['head\.bias'\] holds non-finite values"),
    ("best_weights", lambda d: d.update(best_weights={"x": 1}), r"best_weights\['x'\] must be a tensor"),
    ("scheduler", lambda d: d.update(scheduler=[1]), r"scheduler must be a dict"),
]


@pytest.mark.parametrize("field,tamper,message", TAMPERS, ids=[t[0] for t in TAMPERS])
def test_a_tampered_field_is_a_checkpoint_error_naming_it(tmp_path, field, tamper, message):
    data, path = saved_run(tmp_path)
    saved = ckpt.load(path)
    tamper(saved)
    rehash(saved, path)
    trainer = new_trainer()
    before = snapshot(trainer)
    with pytest.raises(tbptt.CheckpointError, match=message):
        trainer.fit(data, epochs=2, segment_length=4, checkpoint=path, resume=True)
    assert same(before[0], snapshot(trainer)[0]), "a refused checkpoint leaves the model as it was"


def test_resuming_on_other_data_is_refused_unless_allowed(tmp_path):
    (x, y, mask), path = saved_run(tmp_path)
    other = (x.flip(0), y, mask)  # the same shapes, the rows swapped
    with pytest.raises(tbptt.CheckpointError, match="other data .*values.*allow_data_change=True"):
        new_trainer().fit(other, epochs=2, segment_length=4, checkpoint=path, resume=True)
    with pytest.raises(tbptt.CheckpointError, match="other data .*shapes"):
        new_trainer().fit((x[:1], y[:1], mask[:1]), epochs=2, segment_length=4, checkpoint=path, resume=True)
    history = new_trainer().fit(other, epochs=2, segment_length=4, checkpoint=path, resume=True,
                                allow_data_change=True)
    assert [e["epoch"] for e in history.epochs] == [1, 2]


def test_the_command_line_refuses_a_resume_on_other_data_unless_told(tmp_path, capsys):
    small = ["--task", "echo", "--task-option", "steps=40", "--task-option", "eval_steps=20", "--config", "5,5",
             "--hidden", "4", "--segment-length", "10", "--checkpoint", str(tmp_path / "run.pt")]
    assert main(["train", *small, "--task-option", "batch_size=4", "--epochs", "1"]) == 0
    capsys.readouterr()
    resume = ["train", *small, "--task-option", "batch_size=8", "--epochs", "2", "--resume"]
    assert main(resume) == 2
    assert "other data" in capsys.readouterr().err
    assert main(resume + ["--allow-data-change"]) == 0


# ----------------------------------------------------------------------------------------------
# 6. an optimizer that trains nothing, or not everything
def test_an_optimizer_over_other_parameters_is_refused_at_construction():
    model, other = make_model("lstm", 0), make_model("lstm", 1)
    with pytest.raises(tbptt.InvalidArgument, match="holds none of them"):
        tbptt.Trainer(model, mse_steps, torch.optim.SGD(other.parameters(), lr=0.1), tbptt.TBPTT(2, 2))
    with pytest.raises(tbptt.InvalidArgument, match="does not hold head.weight, head.bias"):
        tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.lstm.parameters(), lr=0.1), tbptt.TBPTT(2, 2))
    model.head.requires_grad_(False)  # frozen on purpose: fine
    tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.lstm.parameters(), lr=0.1), tbptt.TBPTT(2, 2))


# ----------------------------------------------------------------------------------------------
# 7. output paths checked before the first update
class Counting:
    updates = 0

    def on_update(self, trainer, record):
        Counting.updates += 1


@pytest.mark.parametrize("option", ["log", "checkpoint"])
def test_an_unwritable_output_of_fit_is_found_before_the_first_update(tmp_path, option):
    blocker = tmp_path / "file"
    blocker.write_text("")
    Counting.updates = 0
    x, y = make_data(0, 2, 12)
    with pytest.raises(ValueError, match=f"{option} '.*file/out.*is a file, not a folder"):
        new_trainer().fit((x, y), callbacks=[Counting()], **{option: blocker / f"out.{'jsonl' if option == 'log' else 'pt'}"})
    with pytest.raises(ValueError, match=r"log must be a path ending in .jsonl or .csv; got '.*\.txt'"):
        new_trainer().fit((x, y), callbacks=[Counting()], log=tmp_path / "log.txt")
    assert Counting.updates == 0


@pytest.mark.parametrize("command", [
    ["train", "--task", "echo", "--config", "5,5", "--log", "{bad}/log.jsonl"],
    ["train", "--task", "echo", "--config", "5,5", "--checkpoint", "{bad}/run.pt"],
    ["compare", "--task", "echo", "--config", "5,5", "--out", "{bad}/report"],
    ["probe", "--task", "echo", "--png", "{bad}/p.png"],
    ["schedule", "4", "12", "--png", "{bad}/s.png"],
    ["bench", "--out", "{bad}/b.json"],
    ["demo", "--out", "{bad}/demo"],
], ids=["train-log", "train-checkpoint", "compare-out", "probe-png", "schedule-png", "bench-out", "demo-out"])
def test_an_unwritable_output_of_a_command_is_found_before_any_work(tmp_path, capsys, command):
    blocker = tmp_path / "file"
    blocker.write_text("")
    started = time.process_time()
    assert main([part.format(bad=blocker) for part in command]) == 2
    err = " ".join(capsys.readouterr().err.split())
    flag = next(p for p in command if "{bad}" in p)
    assert re.search(rf"{command[command.index(flag) - 1]} '.*file/.*': '.*file' is a file, not a folder", err), err
    assert time.process_time() - started < 5, "the error came after some work"


# ----------------------------------------------------------------------------------------------
# 8. a graph that would not fit, found before the first update
def test_a_graph_too_large_for_the_memory_is_refused_before_the_first_update():
    x, y = make_data(0, 4, 400)
    model = make_model("lstm", 0)
    per_step = graph_bytes_per_step(model, x)
    trainer = new_trainer(None, None, "recompute", model=model)
    Counting.updates = 0
    limit = int(per_step * 100)  # TBPTT(n,n) holds 400 steps
    with pytest.raises(GraphMemoryError, match=r"TBPTT\(n,n\) .*400 steps.*checkpoint_segments='sqrt'"):
        trainer.fit((x, y), segment_length=50, max_graph_bytes=limit, callbacks=[Counting()])
    assert Counting.updates == 0
    checkpointed = new_trainer(None, None, "recompute", model=model, checkpoint_segments="sqrt")
    checkpointed.fit((x, y), segment_length=50, max_graph_bytes=limit)
    new_trainer(5, 20, "stored", model=model).fit((x, y), segment_length=50, max_graph_bytes=limit)


def test_the_graph_estimate_is_near_what_autograd_saves():
    from tbptt.experiments.runs import GraphMemory

    x, y = make_data(0, 4, 200)
    model = make_model("lstm", 0)
    estimate = graph_bytes_per_step(model, x) * 200
    meter = GraphMemory()
    trainer = new_trainer(None, None, "recompute", model=model)
    with meter.hooks():
        trainer.train_on(x, y, end_of_stream=True)
    assert 0.5 < estimate / meter.peak < 1.5


# ----------------------------------------------------------------------------------------------
# 9. smaller ones: files, errors that say what to change, a plain launch that exits
def test_atomic_writes_fsync_the_folder_and_clear_leftover_temporaries(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    stale = tmp_path / ".c.pt.abc.tmp"
    stale.write_bytes(b"left by a kill -9 during a save")
    trainer = new_trainer()
    x, y = make_data(0, 2, 8)
    trainer.fit((x, y), checkpoint=tmp_path / "c.pt")
    assert not stale.exists() and synced.count(True) >= 1 and synced.count(False) >= 1


def test_every_file_is_written_through_tbptt_files():
    """No writer of its own: every file goes through atomic_write (the one place that fsyncs, renames,
    uses the umask and clears leftovers)."""
    src = Path(tbptt.__file__).parent
    found = []
    for path in src.rglob("*.py"):
        if path.name == "files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                mode = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
                if name in ("savefig", "write_text", "write_bytes") or (name == "open" and any("w" in str(m) or "a" in str(m) for m in mode)):
                    found.append(f"{path.relative_to(src)}:{node.lineno} {name}")
    assert not found, found


class TimeFirst(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.GRU(3, 4)  # batch_first=False
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x, state):
        out, state = self.rnn(x, state)
        return self.head(out), state


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)

    def forward(self, x, state):
        return self.layer(x), None


def test_a_time_first_model_fed_batch_first_inputs_is_named():
    model = TimeFirst()
    x, y = make_data(0, 2, 6, dtype=torch.float32)
    trainer = tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=0.1), tbptt.TBPTT(3, 3))
    with pytest.raises(ValueError, match="no dimension of size B=2.*rnn is time-first.*batch_first=True"):
        trainer.train_on(x, y)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.float64])
def test_inputs_of_another_dtype_than_the_weights_say_what_to_convert(dtype):
    model = Linear()
    trainer = tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=0.1), tbptt.TBPTT(3, 3))
    x, y = make_data(0, 2, 3, dtype=torch.float32)
    with pytest.raises(TypeError, match=rf"inputs of dtype {dtype} while its weights are torch.float32.*inputs.to\(torch.float32\)"):
        trainer.train_on(x.to(dtype), y)


@pytest.mark.parametrize("strategy", ["recompute", "stored"])
def test_a_loss_without_gradient_says_what_cut_it(strategy):
    model = make_model("lstm", 0)
    detached = lambda o, t: mse_steps(o, t).detach()  # noqa: E731
    trainer = tbptt.Trainer(model, detached, torch.optim.SGD(model.parameters(), lr=0.1), tbptt.TBPTT(2, 4),
                            strategy=strategy)
    x, y = make_data(0, 2, 4)
    with pytest.raises(TypeError, match=r"loss_fn\(outputs, targets\) returned losses without a gradient"):
        trainer.train_on(x, y)
    trainer = new_trainer(2, 4, strategy)
    with torch.no_grad(), pytest.raises(TypeError, match="gradients disabled"):
        trainer.train_on(x, y)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PEER = """
import datetime, time
import torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
time.sleep(120)  # joined, then hung: alive, never answering
"""


def test_a_plain_launch_whose_peer_hangs_exits_with_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1")
    peer = subprocess.Popen([sys.executable, "-c", PEER], env={**env, "RANK": "1"})
    try:
        command = [sys.executable, "-m", "tbptt", "train", "--task", "echo", "--task-option", "steps=20",
                   "--task-option", "eval_steps=10", "--config", "5,5", "--epochs", "1", "--timeout", "3"]
        done = subprocess.run(command, env={**env, "RANK": "0"}, capture_output=True, text=True, timeout=100,
                              cwd=tmp_path)
    finally:
        peer.kill()
        peer.wait()
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    err = " ".join(done.stderr.split())
    assert "error: rank 0 of 2: comparing the ranks' settings failed" in err and "within the timeout" in err


def test_a_rank_whose_peers_never_join_gets_a_distributed_error(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    started = time.perf_counter()
    with pytest.raises(tbptt.DistributedError, match=r"rank 0 of 2: joining the process group .* failed within 1 s"):
        tbptt.init_from_env("gloo", timeout=1)
    assert time.perf_counter() - started < 30


@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.float32])
def test_plain_sgd_on_float16_weights_never_keeps_an_overflow(grad_dtype):
    """The bound takes the narrowest weight dtype's range, and a gradient of a wider dtype than its
    weight (ranks' averaging promotes it) is checked after the step: either overflow is undone."""
    import time as clock

    from tbptt.engine import UpdateResult
    from tbptt.safestep import StepUndo
    from tbptt.schedule import Update
    from tbptt.update import apply_update

    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    optimizer = torch.optim.SGD([a, b], lr=1000.0 if grad_dtype == torch.float16 else 0.01)
    grads = {"a": torch.zeros(3), "b": torch.full((3,), 100.0 if grad_dtype == torch.float16 else 1e5, dtype=grad_dtype)}
    result = UpdateResult(Update(0, 0, 1), torch.tensor(1.0), grads, torch.tensor(1))
    record = apply_update(result, [("a", a), ("b", b)], optimizer, None, "skip", clock.perf_counter(),
                          StepUndo(optimizer))
    assert record.skipped and "non-finite weights" in record.reason
    assert torch.equal(b.detach(), torch.zeros(3, dtype=torch.float16)) and torch.isfinite(a).all()
