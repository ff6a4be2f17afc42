"""Mixed precision (``Trainer(precision=...)``, ``tbptt.precision``) and ``Trainer(compile=...)``.

bf16 is checked against fp32 on the same run; float16's loss scale against ``torch.amp.GradScaler``
itself (the oracle of its rule), and its skipped updates against the weights and optimizer state
before them, bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from torch import nn

from _models import LSTMHead
from tbptt import TBPTT, NonFiniteError, Trainer
from tbptt import checkpoint as ckpt
from tbptt.cli import main
from tbptt.experiments.runs import RunSpec
from tbptt.precision import LossScaler
from tbptt.saved import CheckpointError
from tbptt.validate import InvalidArgument
from _model_loops import one_thread


class RNNHead(nn.Module):
    """nn.RNN and a linear head: both run in float16 under CPU autocast (oneDNN has no float16 LSTM
    on most CPUs, and CPU autocast keeps the cells in float32)."""

    def __init__(self, n_in: int = 3, hidden: int = 8, n_out: int = 2) -> None:
        super().__init__()
        self.rnn = nn.RNN(n_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x, state):
        out, state = self.rnn(x, state)
        return self.head(out), state


_threads = pytest.fixture(autouse=True)(one_thread)  # tiny models: one thread


def lstm16():
    return LSTMHead(3, 16, 2)


def mse(outputs, targets):
    return ((outputs - targets) ** 2).mean(-1)


def stream(batch=4, steps=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, 3, generator=g)
    y = torch.zeros(batch, steps, 2)
    y[:, 2:, 0] = x[:, :-2, 0]  # a delayed copy and a product: learnable through the state
    y[:, 1:, 1] = x[:, :-1, 1] * x[:, :-1, 2]
    return x, y


def trainer(model_cls=RNNHead, precision="fp16", schedule=TBPTT(2, 6), optimizer=torch.optim.SGD, lr=0.1, **kw):
    torch.manual_seed(0)
    model = model_cls()
    return Trainer(model, mse, optimizer(model.parameters(), lr=lr), schedule, precision=precision, **kw)


def weights(t: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in t.model.parameters()])


def lstm_fp16_kernel_works() -> bool:
    layer = nn.LSTM(3, 4, batch_first=True)
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            layer(torch.zeros(1, 1, 3))
        return True
    except RuntimeError:
        return False


# --- bf16 against fp32 ----------------------------------------------------------------------------
def test_bf16_trains_an_lstm_along_the_fp32_loss_curve():
    """bf16 keeps 8 significant bits (rounding 2^-9 ~ 0.2% per value); the losses are float32 means
    over B x T x outputs values, so the curves start ~0.05% apart and drift as Adam moves the two
    runs' weights apart: measured here up to 4.0% on one update (at loss ~0.08, 150 updates in) and
    0.4% on the mean of the last 30. The bounds (10% per update, 2% on the last 30) hold that drift,
    not a loss computed or summed in bf16 or a broken cast; the curves may not be equal either
    (autocast must have run), and both must have learned (loss down 5x)."""
    x, y = stream(batch=8, steps=240)
    curves = {}
    for precision in ("fp32", "bf16"):
        t = trainer(lstm16, precision, TBPTT(8, 16), torch.optim.Adam, 2e-2)
        curve = []
        for _ in range(5):
            curve += [r.loss for r in t.train_on(x, y, end_of_stream=True)]
        curves[precision] = curve
    fp32, bf16 = curves["fp32"], curves["bf16"]
    relative = [abs(a - b) / a for a, b in zip(fp32, bf16)]
    assert len(fp32) == len(bf16) == 150
    assert 0 < max(relative) <= 0.10
    last = sum(fp32[-30:]), sum(bf16[-30:])
    assert abs(last[0] - last[1]) / last[0] <= 0.02
    for curve in (fp32, bf16):
        assert sum(curve[-30:]) * 5 < sum(curve[:30])


def test_bf16_runs_the_forward_in_bf16_and_keeps_weights_losses_and_optimizer_fp32():
    x, y = stream()
    t = trainer(LSTMHead, "bf16", TBPTT(4, 8), torch.optim.Adam, 1e-2)
    records = t.train_on(x, y)
    assert t.state[0].dtype == torch.bfloat16  # the carried state is what the autocast forward returned
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    assert all(v.dtype == torch.float32 for s in t.optimizer.state.values() for v in s.values() if v.dim() > 0)
    out = t.evaluate((x, y))
    assert math.isfinite(out["loss"]) and all(not r.skipped and math.isfinite(r.loss) for r in records)


@pytest.mark.parametrize("precision,model", [("bf16", LSTMHead), ("fp16", RNNHead)])
@pytest.mark.parametrize("strategy,schedule,segments", [
    ("recompute", TBPTT(2, 6), None), ("stored", TBPTT(2, 6), None), ("recompute", TBPTT(4, 4), None),
    ("recompute", TBPTT(2, 8), 2), ("recompute", TBPTT(6, 3), None),
])
def test_every_strategy_and_schedule_trains_finite_at_low_precision(precision, model, strategy, schedule, segments):
    x, y = stream()
    t = trainer(model, precision, schedule, strategy=strategy, checkpoint_segments=segments)
    before = weights(t)
    records = t.train_on(x, y, end_of_stream=True)
    applied = [r for r in records if not r.skipped]
    # fp16's first scale (2^16) may overflow on a large gradient: skipped, the scale lowered
    assert all(r.reason.startswith("non-finite gradient (fp16 overflow") for r in records if r.skipped)
    assert len(applied) >= 0.9 * len(records) and all(math.isfinite(r.loss + r.grad_norm) for r in applied)
    after = weights(t)
    assert torch.isfinite(after).all() and not torch.equal(before, after)


# --- fp16: the loss scale -------------------------------------------------------------------------
def test_fp16_gradient_is_the_fp32_gradient_within_fp16_rounding():
    x, y = stream()
    norms = {}
    for precision in ("fp32", "fp16"):
        t = trainer(RNNHead, precision, TBPTT(2, 6), strategy="stored")
        if t.loss_scaler is not None:
            t.loss_scaler.scale = 2.0**8  # where no update overflows, so that both runs apply every update
        norms[precision] = [r.grad_norm for r in t.train_on(x, y)]
    relative = [abs(a - b) / a for a, b in zip(norms["fp32"], norms["fp16"])]
    assert 0 < max(relative) < 5e-3  # float16: 11 significant bits, the scale keeps them off underflow


@pytest.mark.parametrize("strategy", ["recompute", "stored"])
def test_the_unscaled_gradient_does_not_depend_on_the_scale_even_across_stored_windows(strategy):
    """Scaling by a power of two is exact, so updates computed at a scale changed before every
    update equal those at a fixed scale, bit for bit; under ``stored`` a window's older segments
    (run under an earlier scale) are backpropagated at the scale of the update that uses them."""
    x, y = stream()
    fixed, flipping = (trainer(RNNHead, "fp16", TBPTT(2, 6), strategy=strategy) for _ in range(2))
    fixed.loss_scaler.scale = flipping.loss_scaler.scale = 2.0**8

    def flip(record):
        flipping.loss_scaler.scale = 2.0**4 if flipping.loss_scaler.scale > 2.0**8 else 2.0**12

    flipping.on_record = flip
    a, b = fixed.train_on(x, y), flipping.train_on(x, y)
    assert [r.loss for r in a] == [r.loss for r in b] and [r.grad_norm for r in a] == [r.grad_norm for r in b]
    assert torch.equal(weights(fixed), weights(flipping))


@pytest.mark.parametrize("optimizer,entries", [(torch.optim.Adam, 18), (torch.optim.SGD, 0)])
def test_an_fp16_overflow_is_a_skipped_update_with_its_reason_and_the_weights_untouched(optimizer, entries):
    """Adam: the step is taken and undone; plain SGD: refused before its step (apply_update's two paths)."""
    x, y = stream(steps=8)
    t = trainer(RNNHead, "fp16", TBPTT(4, 4), optimizer, 1e-2, nonfinite="raise")
    t.train_on(x[:, :4], y[:, :4])  # one applied update: Adam has moments to keep
    t.loss_scaler.scale = 2.0**60  # the scaled gradient cannot be held in float16
    before = weights(t).clone()
    moments = {(id(p), k): v.clone() for p, s in t.optimizer.state.items() for k, v in s.items()}
    [record] = t.train_on(x[:, 4:], y[:, 4:])  # nonfinite="raise", yet no error: the scale's overflow
    assert record.skipped and record.reason == "non-finite gradient (fp16 overflow; loss scale lowered to 5.76461e+17)"
    assert math.isfinite(record.loss) and t.updates_skipped == 1
    assert torch.equal(weights(t), before)
    now = {(id(p), k): v for p, s in t.optimizer.state.items() for k, v in s.items()}
    assert len(moments) == entries and now.keys() == moments.keys()  # Adam: 6 parameters x 3
    assert all(torch.equal(v, moments[key]) for key, v in now.items())
    assert t.loss_scaler.scale == 2.0**59 and t.loss_scaler.growth_tracker == 0
    t.loss_scaler.scale = 2.0**8
    record = t.train_on(x[:, :4], y[:, :4])[0]
    assert not record.skipped and t.loss_scaler.growth_tracker == 1


def test_an_overflow_at_a_scale_of_one_is_the_model_s_and_nonfinite_decides():
    x, y = stream(steps=4)
    huge = lambda o, t: mse(o, t) * 1e30  # noqa: E731  finite in float32, its gradient not in float16
    for nonfinite in ("skip", "raise"):
        torch.manual_seed(0)
        model = RNNHead()
        t = Trainer(model, huge, torch.optim.SGD(model.parameters(), lr=0.1), TBPTT(4, 4), precision="fp16",
                    nonfinite=nonfinite)
        t.loss_scaler.scale = 1.0
        before = weights(t).clone()
        if nonfinite == "raise":
            with pytest.raises(NonFiniteError, match=r"even at fp16 loss scale 1; lowered to 0\.5"):
                t.train_on(x, y)
        else:
            [record] = t.train_on(x, y)
            assert record.skipped and record.reason.startswith("non-finite gradient (even at fp16 loss scale 1")
        assert torch.equal(weights(t), before) and t.loss_scaler.scale == 0.5


def drive_grad_scaler(scaler: torch.amp.GradScaler, overflow: bool) -> float:
    p = nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([p], lr=0.0)
    loss = p.sum() * (math.inf if overflow else 1.0)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale()


@settings(max_examples=40, deadline=None)
@given(overflows=hs.lists(hs.booleans(), min_size=1, max_size=25), interval=hs.integers(1, 4),
       factors=hs.sampled_from([(2.0, 0.5), (3.0, 0.3), (1.7, 0.9)]), exponent=hs.integers(-3, 20))
def test_the_loss_scale_follows_grad_scaler_s_rule(overflows, interval, factors, exponent):
    """The oracle is torch.amp.GradScaler itself, driven by a parameter whose gradient overflows or not."""
    growth, backoff = factors
    options = dict(init_scale=2.0**exponent * 1.1, growth_factor=growth, backoff_factor=backoff,
                   growth_interval=interval)
    theirs, ours = torch.amp.GradScaler("cpu", **options), LossScaler(**options)
    for overflow in overflows:
        assert ours.update(not overflow) == drive_grad_scaler(theirs, overflow)
        assert ours.state_dict() == theirs.state_dict()
    again = LossScaler()
    again.load_state_dict(theirs.state_dict())
    assert again.state_dict() == ours.state_dict()


# --- checkpoints ----------------------------------------------------------------------------------
def test_the_loss_scale_and_bf16_stored_windows_resume_bit_exact(tmp_path):
    x, y = stream()
    for precision, model in (("fp16", RNNHead), ("bf16", LSTMHead)):
        straight, first = (trainer(model, precision, TBPTT(2, 6), strategy="stored") for _ in range(2))
        for t in (straight, first):
            if t.loss_scaler is not None:
                t.loss_scaler.scale, t.loss_scaler.growth_tracker = 2.0**40, 7  # overflows, then settles
        expected = [r.loss for r in straight.train_on(x, y)]
        done = [r.loss for r in first.train_on(x[:, :31], y[:, :31])]
        ckpt.save(first.state_dict(), tmp_path / f"{precision}.pt")
        resumed = trainer(model, precision, TBPTT(2, 6), strategy="stored")
        resumed.load_state_dict(ckpt.load(tmp_path / f"{precision}.pt"))
        if precision == "fp16":
            assert resumed.loss_scaler.state_dict() == first.loss_scaler.state_dict() != LossScaler().state_dict()
            assert straight.updates_skipped > 0
        assert done + [r.loss for r in resumed.train_on(x[:, 31:], y[:, 31:])] == expected
        assert torch.equal(weights(resumed), weights(straight))


def test_a_checkpoint_of_another_precision_or_a_bad_scale_is_refused_before_anything_changes():
    x, y = stream(steps=12)
    t = trainer(RNNHead, "fp16", TBPTT(4, 4))
    t.train_on(x, y)
    saved = t.state_dict()
    other = trainer(RNNHead, "fp32", TBPTT(4, 4))
    with pytest.raises(CheckpointError, match="trained with precision 'fp16', this trainer uses 'fp32'"):
        other.load_state_dict(saved)
    bad = {**saved, "precision": {**saved["precision"], "loss_scale": {**saved["precision"]["loss_scale"],
                                                                         "scale": -2.0}}}
    fresh = trainer(RNNHead, "fp16", TBPTT(4, 4))
    before = weights(fresh).clone()
    with pytest.raises(CheckpointError, match=r"precision\.loss_scale\.scale must be a number > 0; got -2\.0"):
        fresh.load_state_dict(bad)
    assert torch.equal(weights(fresh), before) and fresh.position == 0
    legacy = {k: v for k, v in trainer(RNNHead, "fp32", TBPTT(4, 4)).state_dict().items() if k != "precision"}
    trainer(RNNHead, "fp32", TBPTT(4, 4)).load_state_dict(legacy)  # written before precision existed
    with pytest.raises(CheckpointError, match="trained with precision 'fp32'"):
        fresh.load_state_dict(legacy)


# --- bad values -----------------------------------------------------------------------------------
def test_a_bad_precision_or_compile_value_names_the_argument():
    with pytest.raises(InvalidArgument, match=r"precision must be one of 'fp32', 'bf16', 'fp16'; got 'float16'") as e:
        trainer(precision="float16")
    assert e.value.name == "precision"
    with pytest.raises(InvalidArgument, match="compile must be True, False or a dict"):
        trainer(precision="fp32", compile=1)
    with pytest.raises(InvalidArgument, match="precision must be one of") as e:
        RunSpec(task="echo", config="5,5", precision="half")
    assert e.value.name == "precision"


def test_an_fp16_lstm_is_refused_at_construction_where_the_cpu_lacks_its_kernel():
    if lstm_fp16_kernel_works():
        assert trainer(LSTMHead, "fp16").precision == "fp16"
    else:
        with pytest.raises(InvalidArgument, match=r"precision must be a precision lstm \(LSTM\) runs at on cpu"):
            trainer(LSTMHead, "fp16")


def test_the_commands_take_precision(tmp_path, capsys):
    small = ["--task", "echo", "--task-option", "steps=60", "--task-option", "eval_steps=30",
             "--task-option", "batch_size=4", "--config", "5,10", "--hidden", "8", "--epochs", "1"]
    assert main(["train", *small, "--precision", "bf16"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    code = main(["train", *small, "--precision", "fp16"])
    if lstm_fp16_kernel_works():
        assert code == 0
    else:
        assert code == 2 and "--precision must be a precision rnn (LSTM) runs at on cpu" in capsys.readouterr().err
    assert main(["train", *small, "--precision", "fp16", "--model", "rnn"]) == 0
    with pytest.raises(SystemExit):
        main(["train", *small, "--precision", "half"])


# --- compile --------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["recompute", "stored"])
def test_a_compiled_forward_trains_as_the_eager_one(strategy):
    """Dynamo's graphs (the "eager" backend: dynamo's capture, guards and recompiles, without
    inductor's minutes of C++ builds; benchmarks/compile.py runs inductor) through every call the
    engine makes: state None and carried, windows of 2, 4 and 6 steps, and under ``stored`` the
    weight snapshots of functional_call."""
    from _models import GRUCellLoop

    x, y = stream(steps=30)
    eager, compiled = trainer(GRUCellLoop, "fp32", strategy=strategy), \
        trainer(GRUCellLoop, "fp32", strategy=strategy, compile={"backend": "eager"})
    assert [r.loss for r in eager.train_on(x, y)] == [r.loss for r in compiled.train_on(x, y)]
    assert torch.equal(weights(eager), weights(compiled))
    assert compiled.model._compiled_call_impl is not None
    assert list(compiled.state_dict()["model"]) == list(eager.state_dict()["model"])  # compiled in place


def test_compile_true_compiles_the_model_in_place_with_torch_s_defaults(monkeypatch):
    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **options: calls.append((type(self), options)))
    trainer(RNNHead, "fp32", compile=True)
    trainer(RNNHead, "fp32", compile={"mode": "max-autotune"})
    trainer(RNNHead, "fp32")
    assert calls == [(RNNHead, {}), (RNNHead, {"mode": "max-autotune"})]
