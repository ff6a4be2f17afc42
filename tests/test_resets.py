"""Resets inside a stream and gradient checkpointing, against brute-force oracles (float64)."""

import gc

import pytest
import torch
from _models import make_data, make_model, mse_steps, oracle_updates
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from test_trainer import SavedBytes, assert_same_weights, sgd

import tbptt

ks = hs.one_of(hs.none(), hs.integers(1, 6))


def brute_force_with_resets(model, x, y, k1, k2, resets, mask=None):
    """Each row's sequence restarts from the model's own fresh state (None) where it resets: run
    row by row, step by step, so a reset is a fresh start, not a zeroed state."""
    n, batch = x.shape[1], x.shape[0]
    params = list(model.parameters())

    def run_row(b, start, stop, h):
        outs = []
        for t in range(start, stop):
            if resets[b, t]:
                h = None
            o, h = model(x[b : b + 1, t : t + 1], h)
            outs.append(o)
        return outs, h

    trajectory = {}
    with torch.no_grad():
        for b in range(batch):
            h = None
            trajectory[(b, 0)] = None
            for t in range(n):
                _, h = run_row(b, t, t + 1, h)
                trajectory[(b, t + 1)] = h
    grads_out = []
    for start, loss_start, stop in oracle_updates(n, k1, k2, "new"):
        total, count = 0.0, 0
        for b in range(batch):
            h = tbptt.detach(trajectory[(b, start)])
            outs, _ = run_row(b, start, stop, h)
            for t, o in zip(range(start, stop), outs):
                if t >= loss_start and (mask is None or mask[b, t]):
                    total = total + mse_steps(o, y[b : b + 1, t : t + 1]).sum()
                    count += 1
        if count == 0:  # no valid error step: nothing to learn from
            grads_out.append([torch.zeros_like(p) for p in params])
            continue
        grads = torch.autograd.grad(total / count, params, allow_unused=True)
        grads_out.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
    return grads_out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=hs.sampled_from(["lstm", "grucell", "dict"]), n=hs.integers(2, 12), k1=ks, k2=ks,
       seed=hs.integers(0, 999), masked=hs.booleans())
def test_a_stream_with_resets_equals_its_sequences_trained_on_their_own(kind, n, k1, k2, seed, masked):
    assert_resets_equal_brute_force(make_model(kind, seed), n, k1, k2, seed, masked)


def assert_resets_equal_brute_force(model, n, k1, k2, seed, masked):
    """truncated_gradients with random resets (and a random mask) on 3 streams of n steps against
    ``brute_force_with_resets``."""
    x, y = make_data(seed, 3, n)
    g = torch.Generator().manual_seed(seed)
    resets = torch.rand(3, n, generator=g) < 0.25
    mask = (torch.rand(3, n, generator=g) > 0.3) if masked else None
    got = tbptt.truncated_gradients(model, mse_steps, x, y, tbptt.TBPTT(k1, k2), resets=resets, mask=mask)
    want = brute_force_with_resets(model, x, y, k1, k2, resets, mask)
    assert len(got) == len(want)
    for gd, w in zip(got, want):
        for gv, wv in zip(gd.values(), w):
            torch.testing.assert_close(gv, wv, atol=1e-9, rtol=1e-9)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=hs.integers(2, 16), k1=hs.integers(1, 5), k2=hs.integers(1, 9), seed=hs.integers(0, 999))
def test_stored_with_resets_matches_across_cuts_and_never_crosses_a_reset(n, k1, k2, seed):
    """The stored strategy with resets: a row whose sequence restarts gets the same weights as if
    the earlier part of that row had been different (no gradient or state crosses the reset)."""
    x, y = make_data(seed, 2, n)
    resets = torch.zeros(2, n, dtype=torch.bool)
    resets[:, n // 2] = True
    x2 = x.clone()
    x2[:, : n // 2] += 1.0  # change only what precedes the reset, and mask its errors out
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[:, : n // 2] = False
    model_a, model_b = make_model("lstm", seed), make_model("lstm", seed)
    ta = tbptt.Trainer(model_a, mse_steps, sgd(model_a), tbptt.TBPTT(k1, k2), strategy="stored")
    tb = tbptt.Trainer(model_b, mse_steps, sgd(model_b), tbptt.TBPTT(k1, k2), strategy="stored")
    ta.train_on(x, y, mask=mask, resets=resets, end_of_stream=True)
    for a in range(0, n, 3):
        tb.train_on(x2[:, a : a + 3], y[:, a : a + 3], mask=mask[:, a : a + 3], resets=resets[:, a : a + 3])
    tb.reset_state()
    assert_same_weights(model_a, model_b, tol=1e-10)


def test_custom_reset_fn_is_used():
    calls = []

    def reset_fn(state, rows):
        calls.append(rows.clone())
        return tbptt.reset_rows(state, rows)

    model = make_model("lstm", 0)
    x, y = make_data(0, 2, 6)
    resets = torch.zeros(2, 6, dtype=torch.bool)
    resets[1, 3] = True
    tbptt.truncated_gradients(model, mse_steps, x, y, tbptt.TBPTT(6, 6), resets=resets, reset_fn=reset_fn)
    assert len(calls) == 1 and calls[0].tolist() == [False, True]


def test_reset_rows_finds_the_batch_dimension():
    h = torch.ones(2, 3, 4)  # nn.LSTM layout [layers, B, H]
    out = tbptt.reset_rows((h, {"m": torch.ones(3, 5)}), torch.tensor([False, True, False]))
    assert out[0][:, 1].abs().sum() == 0 and out[0][:, 0].sum() == 8
    assert out[1]["m"][1].sum() == 0 and out[1]["m"][0].sum() == 5
    square = tbptt.reset_rows(torch.ones(2, 2, 3), torch.tensor([True, False]))  # layers == B
    assert square[:, 0].abs().sum() == 0 and square[:, 1].sum() == 6
    with pytest.raises(ValueError, match="batch dimension"):
        tbptt.reset_rows(torch.ones(4, 5), torch.tensor([True, False, True]))


def test_bad_flags_are_named():
    model = make_model("lstm", 0)
    x, y = make_data(0, 2, 6)
    with pytest.raises(ValueError, match="resets must be a"):
        tbptt.truncated_gradients(model, mse_steps, x, y, tbptt.TBPTT(2, 2), resets=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool"):
        tbptt.truncated_gradients(model, mse_steps, x, y, tbptt.TBPTT(2, 2), mask=torch.ones(2, 6))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=hs.sampled_from(["lstm", "dict"]), n=hs.integers(1, 14), k1=ks, k2=ks,
       segments=hs.one_of(hs.just("sqrt"), hs.integers(1, 5)), seed=hs.integers(0, 999))
def test_checkpointing_gives_the_same_gradients(kind, n, k1, k2, segments, seed):
    model = make_model(kind, seed)
    x, y = make_data(seed, 2, n)
    plain = tbptt.truncated_gradients(model, mse_steps, x, y, tbptt.TBPTT(k1, k2))
    light = tbptt.truncated_gradients(model, mse_steps, x, y, tbptt.TBPTT(k1, k2), checkpoint_segments=segments)
    for a, b in zip(plain, light):
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-12, rtol=1e-12)


def test_checkpointing_cuts_retained_activations_of_full_bptt():
    peaks = {}
    for segments in (None, "sqrt"):
        torch.manual_seed(0)
        model = make_model("grucell", 0)
        trainer = tbptt.Trainer(model, mse_steps, sgd(model), tbptt.TBPTT.full(), checkpoint_segments=segments)
        x, y = make_data(0, 4, 400)
        counter = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            trainer.train_on(x, y, end_of_stream=True)
        gc.collect()
        peaks[segments] = counter.peak
    assert peaks["sqrt"] < 0.25 * peaks[None], peaks


def test_bad_checkpoint_segments():
    model = make_model("lstm", 0)
    with pytest.raises(ValueError, match="checkpoint_segments"):
        tbptt.Trainer(model, mse_steps, sgd(model), tbptt.TBPTT.full(), checkpoint_segments=0)
