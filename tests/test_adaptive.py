"""AdaptiveTBPTT(k1, tolerance): its rule, its measurement against a step-by-step probe, when a choice
is in force, and training under it against naive loops given the windows it chose."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as hs
from torch.func import functional_call

import tbptt
from tbptt.adaptive import AdaptiveTBPTT
from tbptt.engine import StreamEngine
from tbptt.lagscan import lag_sums, measured_positions
from _models import make_data, make_model, mse_steps
from test_artbp import killed_and_resumed

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_rule_is_the_smallest_window_whose_bias_bound_meets_the_tolerance():
    s = AdaptiveTBPTT(10, tolerance=0.1, max_k2=200)  # lags measured 24 steps apart, 0..192
    assert s.stride == 24
    lags = range(0, 193, 24)
    for growth in (0.3, 0.5, 0.8, 0.9, 0.97):  # a geometric decay: the share dropped is growth**J
        k2 = s.choose([growth**j for j in lags])
        assert growth ** (k2 - 10) <= 0.1 < growth ** (k2 - 11)
        assert s.dropped_share([growth**j for j in lags], k2 - 10) == pytest.approx(growth ** (k2 - 10))
    assert s.choose([1.0] * 9) == 200 and s.choose([1.1**j for j in range(9)]) == 200  # no decay: the longest
    # a signal carried 48 steps, then forgotten: the mass, not one rate fitted to it all, sets k2
    flat = [1.0] * 3 + [0.05 * 0.3**i for i in range(6)]
    k2 = s.choose(flat)
    assert 50 < k2 < 70 and s.dropped_share(flat, k2 - 10) <= 0.1 < s.dropped_share(flat, k2 - 11)
    assert AdaptiveTBPTT(10, min_k2=40).choose([0.1**j for j in range(9)]) == 40
    assert AdaptiveTBPTT(10).lowest == 10 and AdaptiveTBPTT(10, max_k2=18).stride == 1
    assert str(AdaptiveTBPTT(10, tolerance=0.05, every=20)) == "AdaptiveTBPTT(10,tolerance=0.05,every=20)"
    parsed = tbptt.parse_schedule("adaptive:10", {"tolerance": "0.05", "every": "20"})
    assert parsed == AdaptiveTBPTT(10, tolerance=0.05, every=20) == tbptt.parse_schedule(str(parsed))
    for bad, message in [(dict(tolerance=1.5), "tolerance must be a number in \\(0, 1\\)"),
                         (dict(max_k2=10), "max_k2 must be an int > k1 = 10"),
                         (dict(min_k2=300), "min_k2 must be at most max_k2 = 200"),
                         (dict(every=0), "every must be a positive int")]:
        with pytest.raises(ValueError, match=message):
            AdaptiveTBPTT(10, **bad)
    with pytest.raises(ValueError, match="unknown option 'tol'"):
        tbptt.parse_schedule("adaptive:10@tol=3".split("@")[0], {"tol": "3"})


def test_a_choice_is_in_force_from_the_first_window_that_begins_after_it():
    plan = AdaptiveTBPTT(4, max_k2=40, every=1000).plan()
    plan.count = 1  # no measurement due for a while
    plan.due = 1000
    assert plan.update(8).start == 8
    plan.observe([1.0, 0.5, 0.25, 0.125], tbptt.Update(8, 8, 12))  # halved every 5 steps (the stride)
    k2 = plan.choices[-1][2]
    assert k2 == AdaptiveTBPTT(4, max_k2=40).choose([1.0, 0.5, 0.25, 0.125]) == 21
    for end in range(16, 60, 4):
        expected = k2 if end >= 12 + k2 else 4
        assert plan.update(end - 4).window == min(end, expected), end
    plan.reset()  # a new stream: the latest choice holds at once
    assert plan.update(0, stop=4).window == 4 and plan.k2_at(4) == k2


def brute_lag_sums(model, x, y, start, block, stop, positions, entering, mask=None):
    """The probe from scratch: step by step from ``entering``, every state kept, the gradient of the
    sum of the block's valid errors with respect to the state at each position, per-row norms summed."""
    states, h = {start: tbptt.detach(entering)}, tbptt.detach(entering)
    if h is not None:
        h = tuple(t.requires_grad_(True) for t in h)
        states[start] = h
    total = 0.0
    for t in range(start, stop):
        out, h = model(x[:, t : t + 1], h)
        states[t + 1] = h
        if t >= block:
            step = mse_steps(out, y[:, t : t + 1])[:, 0]
            total = total + (step if mask is None else torch.where(mask[:, t], step, torch.zeros_like(step))).sum()
    out = []
    for p in positions:
        grads = torch.autograd.grad(total, list(states[p]), retain_graph=True)
        rows = sum(g.pow(2).sum(dim=(0, 2)) for g in grads)  # nn.LSTM: [layers, B, H]
        out.append(float(rows.sqrt().sum()))
    return out


@settings(max_examples=25, **SETTINGS)
@given(n=hs.integers(12, 30), k1=hs.integers(1, 4), stride=hs.integers(1, 4), batch=hs.integers(1, 3),
       seed=hs.integers(0, 1000), masked=hs.booleans())
def test_the_measurement_is_the_probes_gradient_norms(n, k1, stride, batch, seed, masked):
    model = make_model("lstm", seed)
    x, y = make_data(seed, batch, n)
    mask = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)) > 0.3 if masked else None
    block = (n - 1) // k1 * k1 if (n - 1) // k1 * k1 > 0 else k1
    stop = min(n, block + k1)
    start = max(0, block - 3 * stride - 1)
    with torch.no_grad():
        _, entering = model(x[:, :start], None) if start else (None, None)
    positions = [p for p in measured_positions(start, block, stride) if p > start or entering is not None]
    cuts = sorted({start, stop, *positions})

    def run(a, b, state):
        return model(x[:, a:b], state)

    def block_loss(outputs):
        steps = mse_steps(outputs[:, block - start :], y[:, block:stop])
        return steps.sum() if mask is None else torch.where(mask[:, block:stop], steps, torch.zeros_like(steps)).sum()

    got = lag_sums(run, block_loss, cuts, positions, entering, batch)
    want = brute_lag_sums(model, x, y, start, block, stop, positions, entering, mask)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-9, rtol=1e-9)


def windows(records):
    return [(r.start, r.loss_start, r.stop) for r in records]


def naive_training(model, x, y, updates, strategy):
    """Training given each update's window, from the definitions: ``recompute`` re-runs each window at
    the current weights (a block's steps carried from its window's run); ``stored`` runs each step
    once under the weights of its block and backpropagates each window through those copies."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    carried, step_weights, previous = {0: None}, {}, 0
    for start, loss_start, stop in updates:
        snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():  # the forward trajectory (stored) / the block's run (recompute)
            h = carried[previous if strategy == "stored" else start]
            for t in range(previous if strategy == "stored" else start, stop):
                _, h = model(x[:, t : t + 1], h)
                if t >= previous:
                    carried[t + 1] = h
                    step_weights[t] = snapshot
        h = tbptt.detach(carried[start])
        copies, losses = {}, []
        for t in range(start, stop):
            source = step_weights[t] if strategy == "stored" else snapshot
            weights = copies.setdefault(id(source), {n: w.clone().requires_grad_(True) for n, w in source.items()})
            out, h = functional_call(model, weights, (x[:, t : t + 1], h))
            if t >= loss_start:
                losses.append(mse_steps(out, y[:, t : t + 1]))
        loss = torch.cat(losses, dim=1).mean()
        leaves = [w for c in copies.values() for w in c.values()]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        names = [n for c in copies.values() for n in c]
        for n, g in zip(names, grads):
            if g is not None:
                total[n] += g
        for n, p in model.named_parameters():
            p.grad = total[n]
        opt.step()
        previous = stop
    return model


@pytest.mark.parametrize("strategy", ["recompute", "stored"])
@pytest.mark.parametrize("pieces", [[], [7, 8, 30]])
def test_training_follows_its_choices_and_equals_naive_loops(strategy, pieces):
    """Updates under the k2 in force (each choice from the first window that begins after it), both
    strategies, the stream cut into calls anywhere: the weights of a naive loop given the same windows."""
    x, y = make_data(2, 2, 64)
    model = make_model("lstm", 2)
    schedule = AdaptiveTBPTT(3, tolerance=0.2, max_k2=24, every=4)
    trainer = tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=0.05), schedule, strategy=strategy)
    records, cuts = [], [0, *pieces, 64]
    for a, b in zip(cuts[:-1], cuts[1:]):
        records += trainer.train_on(x[:, a:b], y[:, a:b])
    records += trainer.reset_state()
    measurements = trainer.engine.plan.measurements
    assert len(measurements) >= 3 and len({r.k2 for r in records}) >= 2
    in_force = 3
    for r in records:  # the k2 of each update from the measurements alone
        made = [m for m in measurements if m["position"] + m["k2"] <= r.loss_start + 3]
        in_force = made[-1]["k2"] if made else 3
        assert r.k2 == in_force and r.start == max(0, r.loss_start + 3 - in_force), r
    ref = naive_training(make_model("lstm", 2), x, y, windows(records), strategy)
    for (_, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert trainer.engine.measure_steps == sum(min(24, m["position"]) for m in measurements)
    assert trainer.engine.measure_seconds > 0


def test_the_chosen_k2_grows_with_the_gradients_memory():
    """A linear recurrence h' = a h + x: the state gradient shrinks by a per step, so the measured
    decay is a and k2 = k1 + ceil(log(tolerance) / log(a))."""

    class Leaky(torch.nn.Module):
        def __init__(self, a):
            super().__init__()
            self.a, self.w = a, torch.nn.Parameter(torch.ones(1, dtype=torch.float64))

        def forward(self, x, h):
            h = torch.zeros(x.shape[0], 1, dtype=x.dtype) if h is None else h
            outs = []
            for t in range(x.shape[1]):
                h = self.a * h + self.w * x[:, t]
                outs.append(h)
            return torch.stack(outs, dim=1), h

    x, y = make_data(0, 2, 200, n_in=1, n_out=1)
    for a in (0.5, 0.8, 0.95):
        engine = StreamEngine(Leaky(a), mse_steps, AdaptiveTBPTT(2, tolerance=0.05, max_k2=100, every=20))
        list(engine.feed(x, y, end_of_stream=True))
        growths = [m["growth"] for m in engine.plan.measurements]
        assert len(growths) >= 3 and all(g == pytest.approx(a, rel=1e-9) for g in growths)
        assert {m["k2"] for m in engine.plan.measurements} == {2 + math.ceil(math.log(0.05) / math.log(a))}


def test_resume_after_a_kill_mid_block_equals_an_uninterrupted_run(tmp_path):
    """The choices and the measurement count travel in the checkpoint: bit for bit (stored strategy)."""
    (_, h_whole, t_whole), (_, h_resumed, t_resumed), saved = killed_and_resumed(
        tmp_path, AdaptiveTBPTT(3, max_k2=30, every=3), "stored")
    assert saved["plan"]["measurements"]
    assert [(r.k2, r.loss) for r in h_whole.updates] == [(r.k2, r.loss) for r in h_resumed.updates]
    assert t_whole.engine.plan.measurements == t_resumed.engine.plan.measurements


def test_a_bounded_history_keeps_each_epochs_window(tmp_path):
    """Without every record (the default), each epoch's row has its updates' mean and last window,
    as a callback that sees every record counts them."""

    class Windows:
        def __init__(self):
            self.epochs = [[]]

        def on_update(self, trainer, record):
            self.epochs[-1].append(record.k2)

        def on_epoch_end(self, trainer, info):
            self.epochs.append([])

    x, y = make_data(2, 2, 40)
    model = make_model("lstm", 2)
    trainer = tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=0.05),
                            AdaptiveTBPTT(2, max_k2=20, every=5))
    seen = Windows()
    history = trainer.fit((x, y), epochs=3, segment_length=7, progress=False, callbacks=[seen])
    assert history.records is None
    for row, windows in zip(history.epochs, seen.epochs, strict=False):
        assert row["k2_mean"] == pytest.approx(sum(windows) / len(windows)) and row["k2_last"] == windows[-1]
    assert len({k for w in seen.epochs for k in w}) > 1
    from tbptt.experiments import plot_history_k2

    assert plot_history_k2(history, tmp_path / "k2.png").read_bytes()[:4] == b"\x89PNG"
