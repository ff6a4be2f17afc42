"""The lag probe against closed forms on a linear RNN; k2 recommendation; run summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _models import GRUCellLoop, LSTMHead
from torch import nn

from tbptt import TBPTT, truncated_gradients
from tbptt import diagnostics as dg


class LinearRNN(nn.Module):
    """h_t = A h_{t-1} + B x_t, y_t = C h_t, float64: d h_t / d h_{t-tau} = A^tau exactly."""

    def __init__(self, A: np.ndarray, n_in: int = 2, n_out: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        hidden = A.shape[0]
        self.A = nn.Parameter(torch.tensor(A, dtype=torch.float64))
        self.B = nn.Parameter(torch.randn(hidden, n_in, generator=g, dtype=torch.float64))
        self.C = nn.Parameter(torch.randn(n_out, hidden, generator=g, dtype=torch.float64))

    def forward(self, x, h):
        if h is None:
            h = x.new_zeros(x.shape[0], self.A.shape[0])
        outs = []
        for t in range(x.shape[1]):
            h = h @ self.A.T + x[:, t] @ self.B.T
            outs.append(h @ self.C.T)
        return torch.stack(outs, 1), h


def half_squared_error(outputs, targets):
    return 0.5 * ((outputs - targets) ** 2).sum(-1)


def data(batch=3, steps=40, n_in=2, n_out=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, steps, n_in, generator=g, dtype=torch.float64),
            torch.randn(batch, steps, n_out, generator=g, dtype=torch.float64))


def closed_form_curve(model: LinearRNN, x, y, max_lag, ts):
    """mean over t, rows of ||C^T (C h_t - y_t) A^tau|| with h_t from the recursion in numpy."""
    A, B, C = (p.detach().numpy() for p in (model.A, model.B, model.C))
    xs, ys = x.numpy(), y.numpy()
    batch, steps = xs.shape[:2]
    h = np.zeros((batch, A.shape[0]))
    hs = []
    for t in range(steps):
        h = h @ A.T + xs[:, t] @ B.T
        hs.append(h)
    curve = []
    for tau in range(1, max_lag + 1):
        Atau = np.linalg.matrix_power(A, tau)
        norms = [np.linalg.norm((hs[t] @ C.T - ys[:, t]) @ C @ Atau, axis=1) for t in ts]
        curve.append(float(np.mean(norms)))
    return curve


def test_probe_recovers_the_decay_rate_of_a_scaled_identity():
    a = 0.8
    model = LinearRNN(a * np.eye(4))
    x, y = data()
    profile = dg.gradient_vs_lag(model, x, targets=y, loss_fn=half_squared_error, max_lag=12)
    ratios = [b / a_ for a_, b in zip(profile.norms[:-1], profile.norms[1:])]
    assert ratios == pytest.approx([a] * 11, abs=1e-12)
    assert profile.growth == pytest.approx(a, abs=1e-12)
    assert not profile.exploding


def test_probe_matches_the_closed_form_for_a_diagonal_and_a_full_matrix():
    x, y = data(steps=30)
    g = np.random.default_rng(3)
    for A in (np.diag([0.95, 0.6, 0.3, -0.5]), 0.3 * g.standard_normal((4, 4))):
        model = LinearRNN(A)
        profile = dg.gradient_vs_lag(model, x, targets=y, loss_fn=half_squared_error, max_lag=8, positions=7)
        ts = sorted({round(8 + i * (29 - 8) / 6) for i in range(7)})
        assert profile.positions == len(ts)
        assert profile.norms == pytest.approx(closed_form_curve(model, x, y, 8, ts), rel=1e-10)


def test_spectral_radius_above_one_is_flagged_exploding():
    theta = 0.3  # a rotation scaled by 1.1: spectral radius 1.1, not diagonal
    R = 1.1 * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    x, y = data()
    profile = dg.gradient_vs_lag(LinearRNN(R), x, targets=y, loss_fn=half_squared_error, max_lag=10)
    assert profile.growth == pytest.approx(1.1, abs=1e-9)  # a rotation keeps norms: ratio exactly 1.1
    assert profile.exploding
    assert profile.recommend_k2() is None


def test_recommend_k2_is_the_smallest_window_whose_dropped_lags_are_below_the_fraction():
    # a window of k2 steps keeps lags 1..k2-1 (the state entering it is a constant): it drops norms[k2-1:]
    norms = [1.0, 0.5, 0.25, 0.01, 0.001]  # total 1.761: dropped from k2 = 4 on is 0.011 <= 0.01761 < 0.261
    assert dg.recommend_k2(norms, 0.01) == 4
    assert dg.recommend_k2(norms, 0.2) == 3  # k2 = 3 drops 0.261 <= 0.3522; k2 = 2 drops 0.761
    assert dg.recommend_k2(norms, 0.0005) is None  # the last lag alone is 0.001 > 0.00088: look further
    assert dg.recommend_k2([1.0, 0.0], 0.01) == 2  # only lag 1 carries gradient: a 2-step window holds it
    geometric = [0.7**t for t in range(1, 41)]
    k = dg.recommend_k2(geometric, 0.01)
    assert sum(geometric[k - 1 :]) <= 0.01 * sum(geometric) < sum(geometric[k - 2 :])
    with pytest.raises(ValueError, match="fraction"):
        dg.recommend_k2(norms, 1.5)


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for _, g in sorted(grads.items())])


def test_recommended_k2_truncates_no_more_than_the_fraction_of_a_real_gradient():
    # a nilpotent A (a scaled shift, A^3 = 0): the state carries gradient back two lags and no further
    shift = np.diag([0.9, 0.8], k=-1)
    model = LinearRNN(shift, seed=4)
    x, y = data(batch=2, steps=30, seed=5)
    fraction = 0.01
    profile = dg.gradient_vs_lag(model, x, targets=y, loss_fn=half_squared_error, max_lag=6)
    assert profile.norms[1] > 0 and profile.norms[2:] == [0.0] * 4
    k2 = profile.recommend_k2(fraction)
    assert k2 == 3

    def total(k2_):
        return sum(flat(g) for g in truncated_gradients(model, half_squared_error, x, y, TBPTT(1, k2_)))

    full = total(None)
    assert float((total(k2) - full).norm()) <= fraction * float(full.norm())
    assert float((total(k2 - 1) - full).norm()) > fraction * float(full.norm())


def test_probe_concatenates_lstm_state_leaves_and_handles_tuple_states():
    torch.manual_seed(0)
    x, y = data(batch=2, steps=15, n_in=3, n_out=2)
    lstm = LSTMHead().double()
    profile = dg.gradient_vs_lag(lstm, x, targets=y, loss_fn=half_squared_error, max_lag=5, positions=4)
    # brute force at one step t and lag tau: both leaves of (h, c) after step t - tau, per row
    t, tau = 14, 3
    h = None
    for s in range(t - tau + 1):
        _, h = lstm(x[:, s : s + 1], h)
    h0 = tuple(v.detach().requires_grad_(True) for v in h)
    out, _ = lstm(x[:, t - tau + 1 : t + 1], h0)
    loss = half_squared_error(out[:, -1:], y[:, t : t + 1]).sum()
    gh, gc = torch.autograd.grad(loss, h0)
    per_row = (gh[0].pow(2).sum(-1) + gc[0].pow(2).sum(-1)).sqrt()
    single_lag = dg.gradient_vs_lag(lstm, x[:, : t + 1], targets=y[:, : t + 1], loss_fn=half_squared_error,
                                    max_lag=tau, positions=1)
    assert single_lag.norms[tau - 1] == pytest.approx(float(per_row.mean()), rel=1e-10)
    assert len(profile.norms) == 5 and profile.positions == 4
    grucell = GRUCellLoop().double()
    assert len(dg.gradient_vs_lag(grucell, x, targets=y, loss_fn=half_squared_error, max_lag=4).norms) == 4


def test_probe_rejects_too_short_inputs():
    x, y = data(steps=5)
    with pytest.raises(ValueError, match="max_lag=5"):
        dg.gradient_vs_lag(LinearRNN(0.5 * np.eye(2)), x, targets=y, loss_fn=half_squared_error, max_lag=5)


def test_run_summaries():
    summary = dg.grad_norm_summary([1.0, 2.0, 3.0, 100.0, float("nan")])
    assert summary == {"grad_norm_median": 2.5, "grad_norm_max": 100.0, "grad_spikes": 1}
    assert dg.roughness([1.0, 1.0, 1.0]) == 0.0
    assert dg.roughness([1.0, math.e, 1.0]) == pytest.approx(1.0)  # travels 2, ends where it started
    assert dg.roughness([1.0, math.e, 1.0, math.e]) == pytest.approx(2 / 3)  # travels 3, net 1, 3 steps
    assert dg.roughness([8.0, 2.0, 1.0, 0.01]) == pytest.approx(0.0)  # only falls: not rough, however fast
    assert dg.roughness([2.0, 4.0, 3.0]) == pytest.approx(dg.roughness([20.0, 40.0, 30.0]))
    assert math.isnan(dg.roughness([1.0]))
