"""tbptt.models.scan against a plain per-step loop of h_t = a_t * h_{t-1} + b_t."""

import pytest
import torch
from hypothesis import given, settings, strategies as hs

from _model_loops import one_thread
from tbptt.models.scan import linear_scan, log_scan

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


def loop(a, b, h0=None):
    a = a.expand_as(b)
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


def grads(output, leaves):
    """Gradients of a fixed random projection of ``output``; zeros for a leaf it does not use."""
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=output.real.dtype)
    found = torch.autograd.grad((output * weights).real.sum(), leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, found)]


def coefficients(seed, steps, complex_=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2, steps, 3, generator=g, dtype=dtype)
    b = torch.randn(2, steps, 3, generator=g, dtype=dtype)
    h0 = torch.randn(2, 3, generator=g, dtype=dtype)
    if complex_:
        a = a * torch.exp(1j * torch.randn(2, steps, 3, generator=g, dtype=dtype))
        b = torch.complex(b, torch.randn(2, steps, 3, generator=g, dtype=dtype))
        h0 = torch.complex(h0, torch.randn(2, 3, generator=g, dtype=dtype))
    return a, b, h0


@settings(max_examples=30, deadline=None)
@given(steps=hs.integers(1, 150), complex_=hs.booleans(), carried=hs.booleans(), seed=hs.integers(0, 999))
def test_linear_scan_equals_the_loop_values_and_gradients(steps, complex_, carried, seed):
    a, b, h0 = coefficients(seed, steps, complex_)
    h0 = h0 if carried else None
    leaves = [t.requires_grad_(True) for t in (a, b) + ((h0,) if carried else ())]
    got, want = linear_scan(a, b, h0), loop(a, b, h0)
    torch.testing.assert_close(got, want, atol=1e-13, rtol=1e-13)
    for x, y in zip(grads(got, leaves), grads(want, leaves)):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12)


def test_linear_scan_at_every_length_up_to_70_leaves_its_inputs_alone():
    for steps in range(1, 71):
        a, b, h0 = coefficients(steps, steps)
        before = [t.clone() for t in (a, b, h0)]
        leaves = [t.requires_grad_(True) for t in (a, b, h0)]
        got = linear_scan(a, b, h0)
        torch.testing.assert_close(got, loop(a, b, h0), atol=1e-13, rtol=1e-13)
        for x, y in zip(grads(got, leaves), grads(loop(a, b, h0), leaves)):
            torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12)
        assert all(torch.equal(t, u) for t, u in zip(leaves, before)), steps


def test_linear_scan_broadcasts_a_constant_decay():
    a, b, h0 = coefficients(0, 37, complex_=True)
    lam = a[0, 0].clone().requires_grad_(True)  # [3], the same at every step and row, as LRU's eigenvalues
    got, want = linear_scan(lam, b, h0), loop(lam.expand_as(b), b, h0)
    torch.testing.assert_close(got, want, atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(grads(got, [lam])[0], grads(want, [lam])[0], atol=1e-12, rtol=1e-12)


def test_linear_scan_promotes_a_real_decay_against_complex_inputs_and_checks_h0():
    a, b, h0 = coefficients(0, 9, complex_=True)
    real = a.abs().requires_grad_(True)
    got = linear_scan(real, b, h0)
    assert got.dtype == torch.complex128
    (g,) = grads(got, [real])
    assert g.dtype == torch.float64
    torch.testing.assert_close(g, grads(loop(real.to(b.dtype), b, h0), [real])[0], atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match=r"h0 must be \[B, ...\] = \(2, 3\) for inputs \(2, 9, 3\); got \(3, 2\)"):
        linear_scan(a, b, h0.T)


@settings(max_examples=30, deadline=None)
@given(steps=hs.integers(1, 150), chunk=hs.integers(1, 40), start=hs.sampled_from(["none", "zero", "signed"]),
       seed=hs.integers(0, 999))
def test_log_scan_equals_the_loop_values_and_gradients(steps, chunk, start, seed):
    g = torch.Generator().manual_seed(seed)
    log_a = -torch.nn.functional.softplus(2 * torch.randn(2, steps, 3, generator=g, dtype=torch.float64))
    log_b = torch.randn(2, steps, 3, generator=g, dtype=torch.float64)
    h0 = {"none": None, "zero": torch.zeros(2, 3, dtype=torch.float64),
          "signed": torch.randn(2, 3, generator=g, dtype=torch.float64)}[start]
    leaves = [t.requires_grad_(True) for t in (log_a, log_b) + (() if h0 is None else (h0,))]
    got, want = log_scan(log_a, log_b, h0, chunk=chunk), loop(log_a.exp(), log_b.exp(), h0)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for x, y in zip(grads(got, leaves), grads(want, leaves)):
        assert torch.isfinite(x).all()  # a zero state is never logged
        torch.testing.assert_close(x, y, atol=1e-11, rtol=1e-11)


def test_float32_scans_at_2048_steps_are_as_accurate_as_the_float32_loop():
    """Against the float64 loop: the linear scan within a few times the float32 loop's own error;
    the chunked log-space scan within a small bound (its cancellation is bounded by a chunk)."""
    g = torch.Generator().manual_seed(0)
    k = 2 * torch.randn(4, 2048, 16, generator=g, dtype=torch.float64)
    log_a, log_b = -torch.nn.functional.softplus(k), torch.randn(4, 2048, 16, generator=g, dtype=torch.float64)
    h0 = torch.rand(4, 16, generator=g, dtype=torch.float64)
    truth = loop(log_a.exp(), log_b.exp(), h0)

    def error(h):
        return ((h.double() - truth).abs() / truth.abs()).max().item()

    f32 = [t.float() for t in (log_a, log_b, h0)]
    loop_error = error(loop(f32[0].exp(), f32[1].exp(), f32[2]))
    assert error(linear_scan(f32[0].exp(), f32[1].exp(), f32[2])) < 4 * loop_error + 1e-7
    assert error(log_scan(*f32, chunk=16)) < 2e-5
