"""Diagnostics: how the gradient decays with lag, and summaries of gradient norms and loss curves.

The lag probe answers "how large must k2 be?" for a given model: it measures the norm of
d l_t / d s_{t - tau}, the derivative of the error at step t with respect to the recurrent state
tau steps earlier, averaged over t. A backward pass truncated to a window of k2 steps keeps the lags
0..k2-1 and drops every term with tau >= k2 (Williams & Peng, 1990; the truncation bias of Tallec &
Ollivier, 2017), so the k2 the model needs is one more than the lag by which this curve has spent
its mass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import state as st
from .contract import LossFn
from .decay import check_curve, geometric_rate
from .validate import positive_int


@dataclass(frozen=True)
class LagProfile:
    """Mean gradient norm per lag: ``norms[i]`` is the mean of ||d l_t / d s_{t-tau}|| for
    ``tau = lags[i]``, over ``positions`` steps t (the same steps for every lag) and the batch rows.

    ``growth`` is the fitted ratio of one lag's norm to the previous one (geometric fit); the
    gradient is ``exploding`` when it grows with lag (``growth > 1 + tolerance``).
    """

    lags: list[int]
    norms: list[float]
    positions: int
    growth: float = field(init=False)
    exploding: bool = field(init=False)
    tolerance: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "growth", growth_rate(self.norms))
        object.__setattr__(self, "exploding", self.growth > 1.0 + self.tolerance)

    def recommend_k2(self, fraction: float = 0.01) -> Optional[int]:
        """See ``recommend_k2``."""
        return recommend_k2(self, fraction)

    def as_dict(self) -> dict:
        return {"lags": self.lags, "norms": self.norms, "positions": self.positions,
                "growth": self.growth, "exploding": self.exploding}


def _curve(curve: Union[LagProfile, Sequence[float]]) -> list[float]:
    return check_curve(curve.norms if isinstance(curve, LagProfile) else curve)


def growth_rate(curve: Union[LagProfile, Sequence[float]]) -> float:
    """The per-lag ratio of a geometric fit to the curve: exp of the least-squares slope of
    log(norm) against lag (1.0 for a single lag; zero norms count as 1e-300)."""
    return geometric_rate(_curve(curve))


def recommend_k2(curve: Union[LagProfile, Sequence[float]], fraction: float = 0.01) -> Optional[int]:
    """The smallest k2 whose truncation drops at most ``fraction`` of the gradient's signal.

    With ``norms[tau - 1]`` the mean norm at lag tau = 1..L: a window of k2 steps ending at step t
    reaches the states s_t .. s_{t-k2+1}, so it keeps the lags 0..k2-1 and drops every lag
    tau >= k2 (the state entering the window is a constant). The answer is the smallest k2 with
    ``sum(norms[k2 - 1:]) <= fraction * sum(norms)``, at least 2 (one step keeps no lag at all).
    Returns None when the curve cannot tell: the gradient is exploding, or the last measured lag
    alone carries more than ``fraction`` of the mass (the answer lies past L; measure more lags).
    """
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise ValueError(f"fraction must be a number in (0, 1), e.g. 0.01; got {fraction!r}")
    norms = _curve(curve)
    exploding = curve.exploding if isinstance(curve, LagProfile) else growth_rate(norms) > 1.01
    total = sum(norms)
    if exploding or total == 0.0 or norms[-1] > fraction * total:
        return None
    # k2 = len(norms) always qualifies here: it drops the last lag alone
    return next(k2 for k2 in range(2, len(norms) + 1) if sum(norms[k2 - 1 :]) <= fraction * total)


def gradient_vs_lag(
    model: nn.Module,
    inputs: torch.Tensor,
    state: st.State = None,
    *,
    targets: torch.Tensor,
    loss_fn: LossFn,
    max_lag: int = 50,
    positions: int = 64,
    mask: Optional[torch.Tensor] = None,
    resets: Optional[torch.Tensor] = None,
) -> LagProfile:
    """Measure ||d l_t / d s_{t-tau}|| for tau = 1..``max_lag``, averaged over steps t and rows.

    ``model(inputs[B, T, ...], state) -> (outputs, new_state)`` is run one step at a time from
    ``state`` (None: the model's own start); s_t is the state after step t, all its tensor leaves
    taken together (h and c for nn.LSTM). l_t is ``loss_fn(outputs, targets)`` at step t. The
    average runs over up to ``positions`` steps t evenly spread over ``[max_lag, T)`` (the same
    steps for every lag, so the curve's shape is the decay itself) and over the rows, each row taken
    as its own stream (rows must not interact); ``mask[B, T]`` leaves out invalid (row, t) pairs and
    ``resets[B, T]`` zeroes a row's state before the steps where a new sequence starts (no gradient
    crosses it, so lags reaching past it count as zero).
    The model runs in eval mode and its weights are not changed.
    """
    batch, steps = _check_probe(model, inputs, targets, max_lag, positions)
    ts = _probe_steps(steps, max_lag, positions)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            outputs, states = _run_step_by_step(model, inputs, state, resets, ts[-1] + 1)
            sums = torch.zeros(max_lag, dtype=torch.float64)
            weight = 0.0
            for t in ts:
                losses = loss_fn(outputs[t], targets[:, t : t + 1])
                if tuple(losses.shape) != (batch, 1):
                    raise ValueError(f"loss_fn must return per-step losses [B, T]; got shape {tuple(losses.shape)}")
                rows = torch.ones(batch, dtype=torch.bool) if mask is None else mask[:, t].bool().cpu()
                if not rows.any():
                    continue
                sums += _lag_norms(losses[rows.to(losses.device), 0].sum(), states, t, max_lag, batch)[:, rows].sum(1)
                weight += float(rows.sum())
    finally:
        model.train(was_training)
    if weight == 0:
        raise ValueError("the mask leaves no valid (row, step) pair to probe")
    norms = (sums / weight).tolist()
    return LagProfile(list(range(1, max_lag + 1)), norms, len(ts))


def _check_probe(model: object, inputs: object, targets: torch.Tensor, max_lag: int, positions: int) -> tuple[int, int]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        raise ValueError(f"inputs must be a tensor [B, T, ...]; got {getattr(inputs, 'shape', type(inputs).__name__)}")
    batch, steps = inputs.shape[:2]
    positive_int(max_lag, "max_lag")
    if steps <= max_lag:
        raise ValueError(
            f"the probe needs more steps than max_lag: got T={steps} steps for max_lag={max_lag}; "
            f"pass at least {max_lag + 1} steps or lower max_lag"
        )
    positive_int(positions, "positions")
    if tuple(targets.shape[:2]) != (batch, steps):
        raise ValueError(f"targets must match inputs in [B, T] = {(batch, steps)}; got {tuple(targets.shape[:2])}")
    return batch, steps


def _probe_steps(steps: int, max_lag: int, positions: int) -> list[int]:
    """Up to ``positions`` steps t evenly spread over ``[max_lag, steps)``."""
    count = min(positions, steps - max_lag)
    if count == 1:
        return [steps - 1]
    return sorted({round(max_lag + i * (steps - 1 - max_lag) / (count - 1)) for i in range(count)})


def _run_step_by_step(
    model: nn.Module, inputs: torch.Tensor, state: st.State, resets: Optional[torch.Tensor], steps: int
) -> tuple[list[torch.Tensor], list[st.State]]:
    """The outputs and the state after each of the first ``steps`` steps, one model call per step."""
    states, outputs = [], []
    s = state
    for t in range(steps):
        if resets is not None and s is not None and bool(resets[:, t].any()):
            s = st.reset_rows(s, resets[:, t].bool())
        out, s = model(inputs[:, t : t + 1], s)
        outputs.append(out)
        states.append(s)
    return outputs, states


def _lag_norms(loss: torch.Tensor, states: list[st.State], t: int, max_lag: int, batch: int) -> torch.Tensor:
    """``[max_lag, B]``: per row, the norm of d loss / d s_{t - tau} for tau = 1..max_lag. Rows do not
    interact, so the gradient of the loss summed over rows holds each row's own."""
    leaves = [st.tensors(states[t - tau]) for tau in range(1, max_lag + 1)]
    flat = [leaf for group in leaves for leaf in group]
    grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
    out = torch.zeros(max_lag, batch, dtype=torch.float64)
    offset = 0
    for i, group in enumerate(leaves):
        out[i] = st.row_norms_squared(grads[offset : offset + len(group)], group, batch).sqrt()
        offset += len(group)
    return out


# ----------------------------------------------------------------------------------------------
# summaries of a training run


def grad_norm_summary(norms: Sequence[float], spike_factor: float = 10.0) -> dict[str, float]:
    """Median, max and spike count of per-update gradient norms (finite ones only).

    A spike is an update whose norm exceeds ``spike_factor`` times the median of the run.
    """
    finite = sorted(float(v) for v in norms if math.isfinite(v))
    if not finite:
        return {"grad_norm_median": math.nan, "grad_norm_max": math.nan, "grad_spikes": 0}
    mid = len(finite) // 2
    median = finite[mid] if len(finite) % 2 else 0.5 * (finite[mid - 1] + finite[mid])
    spikes = sum(v > spike_factor * median for v in finite)
    return {"grad_norm_median": median, "grad_norm_max": finite[-1], "grad_spikes": int(spikes)}


def roughness(losses: Sequence[float]) -> float:
    """How much a loss curve goes up and down: the mean |change of log loss| between consecutive
    points beyond what its net change explains, ``(sum |d log l| - |log l_last - log l_first|) / steps``.

    0 for a curve that only falls (or only rises), however fast; scale-free (a curve and a
    multiple of it are as rough). Non-finite and non-positive losses are left out. NaN when fewer
    than two remain.
    """
    logs = [math.log(v) for v in losses if v is not None and math.isfinite(v) and v > 0]
    if len(logs) < 2:
        return math.nan
    travelled = sum(abs(b - a) for a, b in zip(logs[:-1], logs[1:]))
    # a curve that only falls travels its net change exactly; rounding must not make that negative
    return max(0.0, travelled - abs(logs[-1] - logs[0])) / (len(logs) - 1)
