"""truncated_gradients against a brute-force oracle: step-by-step runs, float64, to 1e-9."""

import torch
from _models import make_data, make_model, mse_steps, oracle_updates
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import tbptt

ks = hs.one_of(hs.none(), hs.integers(1, 7))


def detach(state):
    return tbptt.detach(state)


def brute_force(model, x, y, k1, k2, errors, mask=None):
    """The gradient of every update, one model call per step, from the definition."""
    n = x.shape[1]
    # the forward trajectory at fixed weights, one step at a time
    states = [None]
    with torch.no_grad():
        h = None
        for t in range(n):
            _, h = model(x[:, t : t + 1], h)
            states.append(h)
    params = [p for p in model.parameters()]
    out = []
    for start, loss_start, stop in oracle_updates(n, k1, k2, errors):
        h = detach(states[start])
        total, count = 0.0, 0.0
        for t in range(start, stop):
            o, h = model(x[:, t : t + 1], h)
            if t >= loss_start:
                step = mse_steps(o, y[:, t : t + 1])[:, 0]
                if mask is not None:
                    step = torch.where(mask[:, t], step, torch.zeros_like(step))
                    count += float(mask[:, t].sum())
                else:
                    count += x.shape[0]
                total = total + step.sum()
        grads = torch.autograd.grad(total / max(count, 1.0), params, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
    return out




@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=hs.sampled_from(["lstm", "grucell", "dict"]),
    n=hs.integers(1, 13),
    k1=ks,
    k2=ks,
    errors=hs.sampled_from(["new", "window"]),
    batch=hs.integers(1, 3),
    seed=hs.integers(0, 10_000),
)
def test_truncated_gradients_equal_brute_force(kind, n, k1, k2, errors, batch, seed):
    model = make_model(kind, seed)
    x, y = make_data(seed, batch, n)
    schedule = tbptt.TBPTT(k1, k2, errors)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = tbptt.truncated_gradients(model, mse_steps, x, y, schedule)
    want = brute_force(model, x, y, k1, k2, errors)
    assert len(got) == len(want) == len(schedule.updates(n))
    names = [name for name, _ in model.named_parameters()]
    for g, w in zip(got, want):
        assert list(g) == names
        for name, wv in zip(names, w):
            torch.testing.assert_close(g[name], wv, atol=1e-9, rtol=1e-9)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


@settings(max_examples=40, deadline=None)
@given(
    kind=hs.sampled_from(["lstm", "dict"]),
    n=hs.integers(2, 12),
    k1=ks,
    k2=ks,
    seed=hs.integers(0, 10_000),
)
def test_mask_excludes_steps_exactly(kind, n, k1, k2, seed):
    model = make_model(kind, seed)
    x, y = make_data(seed, 3, n)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(3, n, generator=g) > 0.4
    y_poisoned = torch.where(mask[..., None], y, torch.full_like(y, float("nan")))
    got = tbptt.truncated_gradients(model, mse_steps, x, y_poisoned, tbptt.TBPTT(k1, k2), mask=mask)
    want = brute_force(model, x, y, k1, k2, "new", mask=mask)
    for gd, w in zip(got, want):
        for gv, wv in zip(gd.values(), w):
            torch.testing.assert_close(gv, wv, atol=1e-9, rtol=1e-9)


def test_initial_state_is_used():
    model = make_model("lstm", 0)
    x, y = make_data(0, 2, 6)
    h0 = (torch.randn(1, 2, 5, dtype=torch.float64), torch.randn(1, 2, 5, dtype=torch.float64))
    a = tbptt.truncated_gradients(model, mse_steps, x, y, tbptt.TBPTT(3, 3), state=h0)
    b = tbptt.truncated_gradients(model, mse_steps, x, y, tbptt.TBPTT(3, 3))
    assert not torch.allclose(a[0]["lstm.weight_hh_l0"], b[0]["lstm.weight_hh_l0"])


def test_engine_calls_the_model_on_whole_segments():
    calls = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make_model("lstm", 0)

        def forward(self, x, state):
            calls.append(x.shape[1])
            return self.inner(x, state)

    x, y = make_data(0, 2, 100)
    for k1, k2, most in [(10, 10, 1), (10, 40, 3), (25, 5, 2), (None, None, 1)]:
        calls.clear()
        ups = tbptt.TBPTT(k1, k2).updates(100)
        tbptt.truncated_gradients(Spy(), mse_steps, x, y, tbptt.TBPTT(k1, k2))
        assert len(calls) <= most * len(ups), (k1, k2, calls)


def test_stored_segments_no_window_reaches_are_freed_and_keep_the_weights_they_ran_with():
    """The stored graphs live while a window can reach them, no longer (peak memory flat in n), and
    each keeps the weights its block ran with, whatever the optimizer did to the model since."""
    from tbptt.bench.jobs import trainer_job
    from tbptt.bench.measure import peak_memory
    from tbptt.bench.workloads import Workload

    peaks = []
    for n in (60, 600):
        work = Workload(2, 2, 8, 2, n)
        peaks.append(peak_memory(work, trainer_job(work, tbptt.TBPTT(2, 6), "stored"))[1])
    assert peaks[1] <= 1.2 * peaks[0], f"stored's memory grew with the stream: {peaks}"

    torch.manual_seed(0)
    model = make_model("lstm", 0)
    trainer = tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), lr=0.5), tbptt.TBPTT(2, 6),
                            strategy="stored")
    x, y = make_data(0, 2, 12)
    trainer.train_on(x, y)
    for segment in trainer.engine._segments:  # snapshots, not the live weights, which moved on since
        assert any(not torch.equal(segment.weights[n], p) for n, p in model.named_parameters())
        assert all(segment.weights[n].data_ptr() != p.data_ptr() for n, p in model.named_parameters())


def test_a_stored_segment_backpropagates_with_the_buffers_and_weights_its_block_ran_with():
    from tbptt.stored import WeightSnapshot

    weight, buffer = torch.nn.Parameter(torch.ones(3)), torch.ones(3)
    snapshot = WeightSnapshot([("weight", weight)], [buffer])
    with snapshot.hooks():
        y = (weight * buffer * weight).sum()
    with torch.no_grad():
        buffer.mul_(5)  # a running statistic updated after the segment ran
        weight.mul_(3)  # an optimizer step
    (grad,) = torch.autograd.grad(y, weight)
    assert torch.equal(grad, torch.full((3,), 2.0))  # 2 * buffer * weight as they were
