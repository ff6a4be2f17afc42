"""ARTBP(k1, mean_k2) against brute-force oracles written from SEMANTICS.md's definition, its draws
against their law, and its estimate against TBPTT(k1, n)'s gradient.

The oracle gives every step of a window its own copy of the weights and weighs the gradient with
respect to the copy used j steps before the block by q**-j: nothing of the engine's way (scaling the
gradient that crosses the state) is shared.
"""

import math
import random
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as hs
from torch.func import functional_call

import tbptt
from tbptt.artbp import ARTBP
from tbptt.compensation import uniforms
from tbptt.engine import StreamEngine
from _models import make_data, make_model, mse_steps
from test_fit import Dropout, Kill, KillMidBlock

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def trajectory(model, x, resets=None):
    """The forward trajectory at fixed weights, one step at a time: the state entering each step."""
    states, h = [None], None
    with torch.no_grad():
        for t in range(x.shape[1]):
            if resets is not None and h is not None:
                h = tbptt.reset_rows(h, resets[:, t])
            _, h = model(x[:, t : t + 1], h)
            states.append(h)
    return states


def oracle_gradient(model, x, y, start, block, stop, q, entering, mask=None, resets=None):
    """One update from the definition: steps [start, stop) from the constant ``entering`` state, errors
    of [block, stop) (mean over valid steps), the gradient through step u's own weights times
    q**-(block - u) for u before the block."""
    h = tbptt.detach(entering)
    copies, total, count = [], 0.0, 0.0
    for u in range(start, stop):
        if resets is not None and h is not None:
            h = tbptt.reset_rows(h, resets[:, u])
        weights = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        copies.append((u, weights))
        out, h = functional_call(model, weights, (x[:, u : u + 1], h))
        if u >= block:
            step = mse_steps(out, y[:, u : u + 1])[:, 0]
            valid = torch.ones_like(step, dtype=torch.bool) if mask is None else mask[:, u]
            total = total + torch.where(valid, step, torch.zeros_like(step)).sum()
            count += float(valid.sum())
    loss = total / max(count, 1.0)
    leaves = [w for _, c in copies for w in c.values()]
    differentiable = torch.is_tensor(loss) and loss.requires_grad  # every error masked: no gradient
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if differentiable else [None] * len(leaves)
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    i = 0
    for u, c in copies:
        weight = q ** -(block - u) if u < block else 1.0
        for n in c:
            if grads[i] is not None:
                out[n] += weight * grads[i]
            i += 1
    return out


def engine_updates(model, x, y, schedule, seed, mask=None, resets=None, pieces=()):
    engine = StreamEngine(model, mse_steps, schedule, generator=torch.Generator().manual_seed(seed))
    cuts = [0, *pieces, x.shape[1]]
    results = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        cut = (lambda t: None if t is None else t[:, a:b])
        results += list(engine.feed(x[:, a:b], y[:, a:b], cut(mask), end_of_stream=b == x.shape[1], resets=cut(resets)))
    return results


@settings(max_examples=40, **SETTINGS)
@given(kind=hs.sampled_from(["lstm", "grucell", "dict"]), n=hs.integers(1, 14), k1=hs.integers(1, 5),
       extra=hs.floats(0, 6), batch=hs.integers(1, 3), seed=hs.integers(0, 10_000), flags=hs.booleans(),
       cut=hs.integers(1, 13))
def test_each_update_is_the_definitions_gradient_for_the_window_drawn(kind, n, k1, extra, batch, seed, flags, cut):
    """Fixed draws (the engine's, from a seeded generator), any model, masks and resets, the stream
    cut across calls: every update equals the oracle to 1e-9; the windows are those the pure schedule
    draws from the same uniforms."""
    schedule = ARTBP(k1, k1 + extra)
    model = make_model(kind, seed)
    x, y = make_data(seed, batch, n)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, n, generator=g) > 0.3 if flags else None
    resets = torch.rand(batch, n, generator=g) > 0.8 if flags else None
    results = engine_updates(model, x, y, schedule, seed, mask, resets, pieces=[c for c in [cut] if c < n])
    drawn = schedule.updates(n, uniforms(torch.Generator().manual_seed(seed)))
    assert [r.update for r in results] == drawn
    states = trajectory(model, x, resets)
    for r in results:
        u = r.update
        assert r.k2 == k1 + u.loss_start - u.start
        want = oracle_gradient(model, x, y, u.start, u.loss_start, u.stop, schedule.q, states[u.start], mask, resets)
        for name, w in want.items():
            got = r.grads[name] if r.grads[name] is not None else torch.zeros_like(w)
            torch.testing.assert_close(got, w, atol=1e-9, rtol=1e-9)


def test_the_compensated_estimate_is_exactly_unbiased_over_the_law_of_j():
    """Averaging the definition's gradient over J's law (P(J = j) = q**j (1 - q), the windows of
    J >= P all clipped at step 0) gives TBPTT(k1, n)'s gradient for every update, to 1e-10."""
    model, k1, schedule = make_model("lstm", 3), 3, ARTBP(3, 5.5)
    x, y = make_data(3, 2, 14)
    states = trajectory(model, x)
    full = tbptt.truncated_gradients(model, mse_steps, x, y, tbptt.TBPTT(k1, None))
    q = schedule.q
    for i, block in enumerate(range(0, 14, k1)):
        stop = min(14, block + k1)
        mean = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for j in range(block + 1):
            p = q**j * (1 - q) if j < block else q**block  # J >= block: the window starts at 0
            g = oracle_gradient(model, x, y, block - j, block, stop, q, states[block - j])
            for n in mean:
                mean[n] += p * g[n]
        for n in mean:
            torch.testing.assert_close(mean[n], full[i][n], atol=1e-10, rtol=1e-10)


def test_the_mean_over_draws_is_tbptt_k1_n_gradient():
    """The engine's own draws, end to end: the mean of 300 ARTBP(3, 5) estimates of each update of a
    12-step stream lies within 5 standard errors of TBPTT(3, n)'s gradient along each of 4 random
    directions (a fixed seed: the verdict does not change from run to run), and the truncated
    gradient TBPTT(3, 3) is more than 5 standard errors away along at least one of them (the
    test can tell biased from unbiased)."""
    torch.manual_seed(0)
    model = make_model("lstm", 1)
    x, y = make_data(1, 2, 12)
    full = tbptt.truncated_gradients(model, mse_steps, x, y, tbptt.TBPTT(3, None))
    short = tbptt.truncated_gradients(model, mse_steps, x, y, tbptt.TBPTT(3, 3))
    names = list(full[0])
    flat = lambda g: torch.cat([g[n].reshape(-1) for n in names])  # noqa: E731
    directions = torch.randn(4, flat(full[0]).numel(), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    draws = torch.stack([torch.stack([flat(g) for g in tbptt.truncated_gradients(model, mse_steps, x, y, ARTBP(3, 5))])
                         for _ in range(300)])  # [draws, updates, parameters]
    projected = draws @ directions.T  # [draws, updates, directions]
    mean, se = projected.mean(0), projected.std(0) / math.sqrt(draws.shape[0])
    exact = torch.stack([flat(g) for g in full]) @ directions.T
    biased = torch.stack([flat(g) for g in short]) @ directions.T
    z = (mean - exact) / se.clamp_min(1e-300)
    assert z[1:].abs().max() < 5, z  # the first update has no step before its block: no randomness
    torch.testing.assert_close(mean[0], exact[0], atol=1e-12, rtol=0)
    assert ((mean[1:] - biased[1:]) / se[1:]).abs().max() > 5


# ----------------------------------------------------------------------------------------------
# the draws' law: one independent J per update, P(J >= j) = q**j
def simulate(k1, mean_k2, streams, length, seed):
    rng = random.Random(seed)
    schedule = ARTBP(k1, mean_k2)
    plan = schedule.plan(lambda: 1.0 - rng.random())
    js = []
    for _ in range(streams):
        plan.reset()
        row = []
        for block in range(0, length, k1):
            u = plan.update(block)
            plan.closed(u)
            row.append(u.loss_start - u.start if u.start > 0 else None)  # clipped at 0: J unknown
        js.append(row)
    return schedule.q, js


def chi_square(observed, expected):
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected))


def critical(df, z=3.719):
    """The chi-square value exceeded with probability 1e-4 (z: the normal's), Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("k1,mean_k2", [(3, 7), (1, 4), (5, 5.5), (4, 30)])
def test_each_j_has_the_law_and_neighbours_are_independent(k1, mean_k2):
    """20 000 draws (far enough from the stream's start that no window is clipped): the frequencies
    of J = 0..K-1 and J >= K (K about twice the mean of J) match q**j (1 - q) and q**K (chi-square,
    p = 1e-4), and the joint frequencies of (J_m, J_m+1) and (J_m, J_m+2), in 3 classes each, are
    the products of the marginals (chi-square, 4 degrees of freedom, p = 1e-4). Fixed seeds."""
    q = ARTBP(k1, mean_k2).q
    skip = math.ceil(math.log(1e-9) / math.log(q) / k1) + 1  # updates whose windows could reach step 0
    q, js = simulate(k1, mean_k2, streams=250, length=k1 * (skip + 80), seed=k1)
    rows = [row[skip:] for row in js]
    assert all(j is not None for row in rows for j in row)
    flat = [j for row in rows for j in row]
    cells = max(4, round(2 * q / (1 - q)))
    observed = Counter(min(j, cells) for j in flat)
    probs = [q**j * (1 - q) for j in range(cells)] + [q**cells]
    assert chi_square([observed[c] for c in range(cells + 1)], [p * len(flat) for p in probs]) < critical(cells)

    edges = sorted({max(1, round(math.log(0.66) / math.log(q))), max(2, round(math.log(0.33) / math.log(q)))})
    grade = lambda j: sum(j >= e for e in edges)  # noqa: E731
    for gap in (1, 2):
        pairs = [(grade(r[i]), grade(r[i + gap])) for r in rows for i in range(len(r) - gap)]
        a, b = Counter(p[0] for p in pairs), Counter(p[1] for p in pairs)
        joint = Counter(pairs)
        classes = range(len(edges) + 1)
        observed = [joint[(i, j)] for i in classes for j in classes]
        expected = [a[i] * b[j] / len(pairs) for i in classes for j in classes]
        assert chi_square(observed, expected) < critical(4)


def test_the_windows_clipped_at_the_stream_start_have_the_law_too():
    """P(window of update m reaches step 0) = q**P_m: 4000 streams of 4 updates of ARTBP(2, 4)."""
    q, js = simulate(2, 4, streams=4000, length=8, seed=1)
    for m in range(1, 4):
        reached = sum(row[m] is None for row in js) / len(js)
        p = q ** (2 * m)
        assert abs(reached - p) < 5 * math.sqrt(p * (1 - p) / len(js))


# ----------------------------------------------------------------------------------------------
def test_parameters_strategies_and_names():
    assert ARTBP(10, 30).q == pytest.approx(20 / 21) and str(ARTBP(10, 30)) == "ARTBP(10,30)"
    assert ARTBP(10, 30.0) == ARTBP(10, 30) and ARTBP(4, 4).q == 0
    assert tbptt.parse_schedule("artbp:10,30") == ARTBP(10, 30) == tbptt.parse_schedule(str(ARTBP(10, 30)))
    with pytest.raises(ValueError, match="mean_k2 must be a number >= k1 = 10"):
        ARTBP(10, 5)
    with pytest.raises(ValueError, match="k1 must be a positive int"):
        ARTBP(0, 5)
    with pytest.raises(ValueError, match="expected artbp:K1,MEAN_K2"):
        tbptt.parse_schedule("artbp:10")
    model = make_model("lstm", 0)
    with pytest.raises(ValueError, match="needs strategy='recompute'"):
        tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), 0.1), ARTBP(3, 6), strategy="stored")


def test_mean_k2_equal_to_k1_is_tbptt_k_k():
    model = make_model("lstm", 0)
    x, y = make_data(0, 2, 11)
    a = tbptt.truncated_gradients(model, mse_steps, x, y, ARTBP(4, 4))
    b = tbptt.truncated_gradients(model, mse_steps, x, y, tbptt.TBPTT(4, 4))
    for ga, gb in zip(a, b, strict=True):
        for n in ga:
            assert torch.equal(ga[n], gb[n])


def test_draws_come_from_torch_seed_and_records_say_the_window(tmp_path):
    model = make_model("lstm", 0)
    x, y = make_data(0, 2, 40)

    def records(seed):
        m = make_model("lstm", 0)  # (seeds torch with 0)
        torch.manual_seed(seed)
        trainer = tbptt.Trainer(m, mse_steps, torch.optim.SGD(m.parameters(), 0.05), ARTBP(4, 12))
        return trainer.train_on(x, y, end_of_stream=True)

    a, b, c = records(1), records(1), records(2)
    assert [r.start for r in a] == [r.start for r in b] != [r.start for r in c]
    assert all(r.k2 == 4 + r.loss_start - r.start for r in a)
    assert len({r.k2 for r in a}) > 2
    assert tbptt.History(records=a).k2() == [r.k2 for r in a]
    from tbptt.experiments import plot_history_k2

    assert plot_history_k2(tbptt.History(records=a), tmp_path / "k2.png", "ARTBP(4,12)").read_bytes()[:4] == b"\x89PNG"
    del model


@pytest.mark.parametrize("pieces", [[], [5], [3, 9, 10]])
def test_training_equals_a_naive_loop_with_the_same_windows(pieces):
    """Trainer with ARTBP against a step-by-step loop (per-step weight copies, q**-j weights, the
    trajectory of recompute: a block's steps carried from its window's run), given the windows the
    trainer drew; the stream cut into calls anywhere."""
    x, y = make_data(4, 2, 17)
    torch.manual_seed(3)
    model = make_model("dict", 4)
    trainer = tbptt.Trainer(model, mse_steps, torch.optim.SGD(model.parameters(), 0.1), ARTBP(3, 7))
    records, cuts = [], [0, *pieces, 17]
    for a, b in zip(cuts[:-1], cuts[1:]):
        records += trainer.train_on(x[:, a:b], y[:, a:b])
    records += trainer.reset_state()

    ref = make_model("dict", 4)
    opt = torch.optim.SGD(ref.parameters(), 0.1)
    carried = {0: None}
    for r in records:
        grads = oracle_gradient(ref, x, y, r.start, r.loss_start, r.stop, ARTBP(3, 7).q, carried[r.start])
        with torch.no_grad():  # the block's steps, run in its window at the weights before the step
            h = tbptt.detach(carried[r.start])
            for t in range(r.start, r.stop):
                _, h = ref(x[:, t : t + 1], h)
                if t >= r.loss_start:
                    carried[t + 1] = h
        for n, p in ref.named_parameters():
            p.grad = grads[n]
        opt.step()
    for (_, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def killed_and_resumed(tmp_path, schedule, strategy="recompute", steps=60):
    """The same fit (dropout, checkpoints every 2 updates, calls of k1 + 1 steps) uninterrupted, and
    killed past a mid-block checkpoint then resumed: (model, history, trainer) of each."""
    x, y = make_data(1, 3, steps)
    k1 = schedule.k1

    def run(kill_at=None, resume=False, path=tmp_path / "run.pt"):
        torch.manual_seed(5)
        model = Dropout().double()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        trainer = tbptt.Trainer(model, mse_steps, opt, schedule, strategy=strategy)
        callbacks = [KillMidBlock(kill_at, path, k1)] if kill_at else []
        history = trainer.fit((x, y), epochs=3, valid=(x, y), segment_length=k1 + 1, callbacks=callbacks,
                              checkpoint=path, checkpoint_every=2, resume=resume, keep_updates=True)
        return model, history, trainer

    whole = run(path=tmp_path / "whole.pt")
    with pytest.raises(Kill):
        run(kill_at=len(whole[1].updates) // 2 + 1)
    saved = tbptt.checkpoint.load(tmp_path / "run.pt")["engine"]["plan"]
    resumed = run(resume=True)
    for a, b in zip(whole[0].state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(a, b)
    return whole, resumed, saved


def test_resume_after_a_kill_mid_block_equals_an_uninterrupted_run(tmp_path):
    """The generator's state and the window starts already drawn travel in the checkpoint: a run
    killed mid-block and resumed draws the same windows and ends with the same weights, bit for bit."""
    (_, h_whole, _), (_, h_resumed, _), saved = killed_and_resumed(tmp_path, ARTBP(3, 9))
    assert "generator" in saved
    assert [(r.start, r.loss) for r in h_whole.updates] == [(r.start, r.loss) for r in h_resumed.updates]


def test_a_checkpoint_whose_draws_were_tampered_with_is_refused_by_field(tmp_path):
    model = make_model("lstm", 0)
    x, y = make_data(0, 2, 20)
    engine = StreamEngine(model, mse_steps, ARTBP(3, 7))
    list(engine.feed(x[:, :14], y[:, :14]))
    saved = engine.state_dict()
    for change, field in [(lambda p: p.update(generator=[1, 2]), "engine.plan.generator"),
                          (lambda p: p.pop("generator"), "engine.plan.generator is missing"),
                          (lambda p: p.update(generator=torch.zeros(3, dtype=torch.uint8)), "not a generator's state"),
                          (lambda p: p.update(plan={"drawn": 12}), "engine.plan.plan does not hold"),
                          (lambda p: p.update(measure_steps=-1), "engine.plan.measure_steps")]:
        bad = {**saved, "plan": dict(saved["plan"])}
        change(bad["plan"])
        fresh = StreamEngine(model, mse_steps, ARTBP(3, 7))
        with pytest.raises(tbptt.CheckpointError, match=field):
            fresh.load_state_dict(bad)
        assert fresh.position == 0  # left as it was
    resumed = StreamEngine(model, mse_steps, ARTBP(3, 7))
    resumed.load_state_dict(saved)
    assert [r.update for r in resumed.feed(x[:, 14:], y[:, 14:], end_of_stream=True)] == [
        r.update for r in engine.feed(x[:, 14:], y[:, 14:], end_of_stream=True)]
