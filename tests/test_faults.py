"""Fault injection (issue 13), bounded for CI: kill -9 at random moments of a fit that checkpoints
after every update, then resume and compare bit for bit; random byte flips, truncations and
field tamperings of checkpoints; a fuzz of the public API with invalid values.

``TBPTT_FAULTS`` scales every count (default 1, about a minute here; ``TBPTT_FAULTS=20`` for the
longer run whose figures docs/reliability.md reports). ``TBPTT_FAULTS_SEED`` fixes the draws.
Each part prints its figures (``pytest -s`` shows them).
"""

import math
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

import tbptt
from tbptt import checkpoint as ckpt
from tbptt.files import atomic_write, leftover_temporaries
from _models import make_data, make_model, mse_steps
from test_fit import Dropout  # an LSTM with dropout inside the recurrence: a resume replays its draws
from test_reliability import Stop, StopAt

SCALE = float(os.environ.get("TBPTT_FAULTS", "1"))
SEED = int(os.environ.get("TBPTT_FAULTS_SEED", "13"))


def count(n: int) -> int:
    return max(1, round(n * SCALE))


def data():
    x, y = make_data(4, 3, 48)
    mask = torch.ones(3, 48, dtype=torch.bool)
    mask[0, :3] = False
    mask[2, 30:] = False
    resets = torch.zeros(3, 48, dtype=torch.bool)
    resets[1, 17] = True
    resets[2, 9] = True
    return tbptt.Split(x, y, mask, resets)


CONFIGS = [(3, 8, "stored"), (3, 8, "recompute"), (5, 5, "recompute"), (7, 2, "stored")]


def fit(path, k1, k2, strategy, resume=False):
    torch.manual_seed(5)
    model = Dropout().double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    trainer = tbptt.Trainer(model, mse_steps, opt, tbptt.TBPTT(k1, k2), strategy=strategy, clip_grad_norm=1.0)
    split = data()
    history = trainer.fit(split, epochs=2, valid=split, segment_length=k1 + 1, scheduler=sched, checkpoint=path,
                          checkpoint_every=1, resume=resume, keep_updates=True, progress=False)
    return model, history


def _child(path, config):
    torch.set_num_threads(1)
    fit(path, *config)
    os._exit(0)


def test_kill_9_at_random_moments_then_resume_is_bit_for_bit(tmp_path, capsys):
    rng = random.Random(SEED)
    fork = multiprocessing.get_context("fork")
    kills = survived = finished_first = 0
    for i in range(count(4)):
        config = CONFIGS[i % len(CONFIGS)]
        started = time.perf_counter()
        whole, h_whole = fit(tmp_path / f"whole{i}.pt", *config)
        duration = time.perf_counter() - started
        path = tmp_path / f"run{i}.pt"
        child = fork.Process(target=_child, args=(path, config))
        child.start()
        time.sleep(rng.uniform(0.05, 0.6) * duration)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        if child.exitcode != -signal.SIGKILL:
            finished_first += 1
        else:
            kills += 1
        resumed, h_resumed = fit(path, *config, resume=path.exists())
        for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), f"kill {i} ({config}): {name} differs after the resume"
        assert [r.loss for r in h_whole.updates] == [r.loss for r in h_resumed.updates]
        assert [e["valid_loss"] for e in h_whole.epochs] == [e["valid_loss"] for e in h_resumed.epochs]
        assert leftover_temporaries(path) == []
        survived += child.exitcode == -signal.SIGKILL
    with capsys.disabled():
        print(f"\nkill -9: {kills} kills mid-run, {survived} resumed bit for bit ({finished_first} runs ended "
              "before their kill and resumed from their last checkpoint)")
    assert survived == kills


# ----------------------------------------------------------------------------------------------
def a_checkpoint(tmp_path):
    """A checkpoint taken mid-block under ``stored``: every part of the format is in it."""
    path = tmp_path / "c.pt"
    torch.manual_seed(5)
    model = Dropout().double()
    trainer = tbptt.Trainer(model, mse_steps, torch.optim.Adam(model.parameters(), lr=0.01), tbptt.TBPTT(3, 8),
                            strategy="stored")
    with pytest.raises(Stop):
        trainer.fit(data(), epochs=2, segment_length=4, checkpoint=path, checkpoint_every=1, callbacks=[StopAt(20)])
    return path


def corrupt(good: bytes, rng: random.Random) -> bytes:
    """One random damage: flipped bytes (1 to 64, anywhere), a truncation, a zeroed block, garbage
    appended, or two blocks swapped."""
    kind = rng.randrange(5)
    data = bytearray(good)
    if kind == 0:
        for _ in range(rng.randint(1, 64)):
            data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    elif kind == 1:
        del data[rng.randrange(len(data)):]
    elif kind == 2:
        a = rng.randrange(len(data))
        end = min(len(data), a + rng.randint(1, 4096))
        data[a:end] = bytes(end - a)
    elif kind == 3:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 100)))
    else:
        n = rng.randint(1, 512)
        a = rng.randrange(len(data) - 2 * n)
        b = rng.randrange(a + n, len(data) - n)
        data[a:a + n], data[b:b + n] = data[b:b + n], data[a:a + n]
    return bytes(data)


def test_every_random_corruption_of_a_checkpoint_is_refused(tmp_path, capsys):
    path = a_checkpoint(tmp_path)
    good = path.read_bytes()
    rng = random.Random(SEED)
    tried = caught = unchanged = 0
    for _ in range(count(300)):
        damaged = corrupt(good, rng)
        if damaged == good:
            unchanged += 1
            continue
        tried += 1
        path.write_bytes(damaged)
        try:
            ckpt.load(path)
        except tbptt.CheckpointError:
            caught += 1
    with capsys.disabled():
        print(f"\ncorruptions: {caught} of {tried} caught as CheckpointError ({unchanged} draws left the file as it was)")
    assert caught == tried


# ----------------------------------------------------------------------------------------------
BAD_VALUES = [-1, 0, 10**12, -(10**12), 1.5, float("nan"), float("inf"), "x", None, True, [], {}, (1,),
              torch.tensor([1.0, 2.0])]


def paths(tree, prefix=()):
    """Every (path, value) of a nesting of dicts and lists, leaves and inner nodes alike."""
    out = []
    if isinstance(tree, dict):
        items = list(tree.items())
    elif isinstance(tree, (list, tuple)):
        items = list(enumerate(tree))
    else:
        return out
    for key, value in items:
        here = prefix + (key,)
        out.append((here, value))
        out.extend(paths(value, here))
    return out


def tampered(saved, path, rng):
    """``saved`` with one field (picked at random) replaced by a bad value or removed."""
    copy = torch.utils._pytree.tree_map(lambda x: x, saved)  # fresh containers, shared tensors
    where, _ = rng.choice([p for p in paths(copy) if p[0][0] not in ("format", "version")])
    parent = copy
    for key in where[:-1]:
        parent[key] = list(parent[key]) if isinstance(parent[key], tuple) else parent[key]
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[where[-1]]
        return copy, where, "removed"
    value = rng.choice(BAD_VALUES)
    parent[where[-1]] = value
    return copy, where, value


def test_a_random_tampered_field_is_a_checkpoint_error_or_harmless_never_a_raw_error(tmp_path, capsys):
    path = a_checkpoint(tmp_path)
    saved = ckpt.load(path)
    rng = random.Random(SEED)
    outcomes = {"CheckpointError": 0, "accepted": 0}
    raw = []
    for i in range(count(60)):
        bad, where, value = tampered(saved, path, rng)
        target = tmp_path / f"t{i}.pt"
        atomic_write(target, lambda f: ckpt._write({k: v for k, v in bad.items() if k not in ("format", "version")}, f))
        torch.manual_seed(5)
        model = Dropout().double()
        trainer = tbptt.Trainer(model, mse_steps, torch.optim.Adam(model.parameters(), lr=0.01), tbptt.TBPTT(3, 8),
                                strategy="stored")
        try:
            trainer.fit(data(), epochs=2, segment_length=4, checkpoint=target, resume=True)
            outcomes["accepted"] += 1
        except tbptt.CheckpointError:
            outcomes["CheckpointError"] += 1
        except Exception as exc:  # noqa: BLE001 - counting what escapes is the point
            raw.append(f"{'.'.join(map(str, where))} = {value!r}: {type(exc).__name__}: {exc}"[:300])
    with capsys.disabled():
        print(f"\ntampered fields: {outcomes['CheckpointError']} CheckpointError, {outcomes['accepted']} accepted as "
              f"harmless, {len(raw)} raw errors")
    assert not raw, "\n".join(raw)


# ----------------------------------------------------------------------------------------------
def fuzz_cases():
    """(what, argument, call) for invalid values of the public API's arguments; a clear error is a
    ValueError or TypeError that names the argument."""
    model = make_model("lstm", 0)
    opt = lambda: torch.optim.SGD(model.parameters(), lr=0.1)  # noqa: E731
    trainer = lambda **k: tbptt.Trainer(model, mse_steps, opt(), tbptt.TBPTT(2, 2), **k)  # noqa: E731
    x, y = make_data(0, 2, 6)
    cases = []
    for v in (0, -1, 1.5, "3", True, float("nan")):
        cases.append(("TBPTT", "k1", lambda v=v: tbptt.TBPTT(v, 2)))
        cases.append(("TBPTT", "k2", lambda v=v: tbptt.TBPTT(2, v)))
    cases.append(("TBPTT", "errors", lambda: tbptt.TBPTT(2, 2, "all")))
    for v in ("stored!", 1, None):
        cases.append(("Trainer", "strategy", lambda v=v: trainer(strategy=v)))
    for v in (0, -1.0, float("nan"), "1", float("inf")):
        cases.append(("Trainer", "clip_grad_norm", lambda v=v: trainer(clip_grad_norm=v)))
    for v in ("ignore", None, 1):
        cases.append(("Trainer", "nonfinite", lambda v=v: trainer(nonfinite=v)))
    for v in (0, -2, "half", 1.5):
        cases.append(("Trainer", "checkpoint_segments", lambda v=v: trainer(checkpoint_segments=v)))
    cases.append(("Trainer", "check_model", lambda: trainer(check_model="yes")))
    cases.append(("Trainer", "optimizer", lambda: tbptt.Trainer(model, mse_steps, "adam", tbptt.TBPTT(2, 2))))
    cases.append(("Trainer", "schedule", lambda: tbptt.Trainer(model, mse_steps, opt(), (2, 2))))
    cases.append(("Trainer", "model", lambda: tbptt.Trainer(lambda a, b: a, mse_steps, opt(), tbptt.TBPTT(2, 2))))
    cases.append(("Trainer", "loss_fn", lambda: tbptt.Trainer(model, "mse", opt(), tbptt.TBPTT(2, 2))))
    cases.append(("Trainer", "lr", lambda: tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=math.inf),
                                                           tbptt.TBPTT(2, 2))))
    single = make_model("lstm", 0).float()
    cases.append(("Trainer", "lr", lambda: tbptt.Trainer(single, mse_steps, torch.optim.SGD(single.parameters(), lr=1e308),
                                                           tbptt.TBPTT(2, 2))))
    fit_values = {
        # epochs=None is valid: one epoch, or until the budget runs out
        "epochs": (0, -1, 1.5, "2"), "segment_length": (0, -3, 2.5, "4"), "patience": (0, -1, "2"),
        "budget": ("cpu", "gpu:3", "backward:0", 3),
        "checkpoint_every": (0, -1, 1.5), "max_seconds": (-1, float("nan"), "10"), "scheduler_interval": ("step", None),
        "restore_best": ("yes", 2), "resume": ("yes", 2), "progress": ("yes", 2), "keep_updates": ("all", 2),
        "allow_data_change": ("yes",), "max_graph_bytes": (0, -5, 1.5), "log": ("run.txt", "run"),
    }
    for name, values in fit_values.items():
        for v in values:
            cases.append(("fit", name, lambda name=name, v=v: trainer().fit((x, y), **{name: v})))
    for name, bad in (("inputs", lambda: [1, 2]), ("inputs", lambda: x[0]), ("targets", lambda: y[:, :3]),
                      ("mask", lambda: torch.ones(2, 6)), ("mask", lambda: torch.ones(2, 5, dtype=torch.bool)),
                      ("resets", lambda: torch.ones(3, 6, dtype=torch.bool))):
        call = {"inputs": lambda b: trainer().train_on(b(), y), "targets": lambda b: trainer().train_on(x, b()),
                "mask": lambda b: trainer().train_on(x, y, mask=b()),
                "resets": lambda b: trainer().train_on(x, y, resets=b())}[name]
        cases.append(("train_on", name, lambda call=call, bad=bad: call(bad)))
    for v in (0, -1, "4"):
        cases.append(("evaluate", "segment_length", lambda v=v: trainer().evaluate((x, y), segment_length=v)))
    cases.append(("fit", "train", lambda: trainer().fit(x)))
    cases.append(("fit", "train", lambda: trainer().fit((x,))))
    for v in (0, -1, 2.5, "4"):
        cases.append(("stateful_streams", "batch_size", lambda v=v: tbptt.stateful_streams(x[0], y[0], v)))
        cases.append(("packed_streams", "batch_size", lambda v=v: tbptt.packed_streams([x[0]], [y[0]], v)))
        cases.append(("RecurrentNet", "hidden", lambda v=v: tbptt.RecurrentNet(3, v, 2)))
        cases.append(("gradient_vs_lag", "max_lag", lambda v=v: tbptt.gradient_vs_lag(model, x, targets=y,
                                                                                     loss_fn=mse_steps, max_lag=v)))
    cases.append(("RecurrentNet", "cell", lambda: tbptt.RecurrentNet(3, 4, 2, cell="transformer")))
    for v in (0, 1.5, -0.1, "0.1"):
        cases.append(("recommend_k2", "fraction", lambda v=v: tbptt.recommend_k2([1.0, 0.5, 0.1], v)))
    cases.append(("load_task", "task", lambda: tbptt.load_task("nope")))
    for v in (0, -1, "x"):
        cases.append(("load_task", "steps", lambda v=v: tbptt.load_task("echo", steps=v)))
        cases.append(("load_task", "delay", lambda v=v: tbptt.load_task("echo", delay=v)))
    cases.append(("load_task", "colour", lambda: tbptt.load_task("echo", colour=1)))
    for v in (0, -1, "8"):
        cases.append(("Split.rows", "world", lambda v=v: tbptt.Split(x, y).rows(0, v)))
    cases.append(("Split.rows", "rank", lambda: tbptt.Split(x, y).rows(5, 2)))
    cases.append(("Split", "mask", lambda: tbptt.Split(x, y, torch.ones(2, 6))))
    cases.append(("truncated_gradients", "schedule", lambda: tbptt.truncated_gradients(model, mse_steps, x, y, (2, 2))))
    cases.append(("check_model", "inputs", lambda: tbptt.check_model(model, [1, 2, 3])))
    cases.append(("init_from_env", "timeout", lambda: tbptt.init_from_env(timeout=-1)))
    cases.append(("init_from_env", "backend", lambda: tbptt.init_from_env(backend="mpi")))
    return cases


def test_invalid_values_of_the_public_api_get_errors_that_name_them(capsys):
    clear, raw = 0, []
    cases = fuzz_cases()
    for what, argument, call in cases:
        try:
            call()
            raw.append(f"{what}({argument}=...): no error")
        except (ValueError, TypeError) as exc:
            if argument in str(exc):
                clear += 1
            else:
                raw.append(f"{what}({argument}=...): {type(exc).__name__} not naming it: {exc}")
        except Exception as exc:  # noqa: BLE001 - counting what escapes is the point
            raw.append(f"{what}({argument}=...): {type(exc).__name__}: {exc}")
    with capsys.disabled():
        print(f"\nAPI fuzz: {len(cases)} invalid values tried, {clear} clear errors naming the argument, {len(raw)} raw")
    assert not raw, "\n".join(raw)
