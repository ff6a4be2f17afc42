"""One update applied: the gradient clipped, one optimizer step, the checks that no non-finite loss,
gradient or weight survives it (the step undone, or never taken, when one would), and its record.
``Trainer``, ``DistributedTrainer`` and Lightning's ``TBPTTModule`` apply every update with
``apply_update``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal, Optional

import torch
from torch import nn

from .engine import UpdateResult
from .precision import LossScaler
from .records import NonFiniteError, UpdateRecord
from .safestep import StepUndo, all_finite, sgd_rate, total_norm

NonFinite = Literal["skip", "raise"]


def apply_update(
    result: UpdateResult,
    named: list[tuple[str, nn.Parameter]],
    optimizer: Any,
    clip_grad_norm: Optional[float],
    nonfinite: NonFinite,
    started: float,
    undo: Optional[StepUndo] = None,
    scaler: Optional[LossScaler] = None,
) -> UpdateRecord:
    """Apply one update's gradient to the parameters ``named`` with one ``optimizer.step()``, or
    skip it: the record says which and why (a non-finite loss, gradient or updated weight, no valid
    step).

    The gradient is clipped to ``clip_grad_norm`` first. After the step one host sync brings back
    the loss, the gradient norm, the count of valid steps and whether the weights are finite; if
    any fails, the step is undone (the weights and the optimizer's state as before it, from copies
    ``undo`` took before the step) and the update skipped, or, with ``nonfinite="raise"``, a
    ``NonFiniteError`` raised. With plain SGD (no momentum, no weight decay) the sync comes before
    the step instead: a refused update is not stepped at all, and a step that provably cannot make
    a weight non-finite (``safestep.sgd_step_bound``) is taken without copies or a check after it.
    ``optimizer`` is a torch optimizer, or a wrapper of one that owns the step (Lightning's);
    ``undo``: a ``StepUndo`` of it kept between updates (its buffers and its bound on the weights
    are reused; None makes one). ``started``: the ``time.perf_counter()`` at which the update's work
    began, for the record's wall time. ``scaler``: float16's ``LossScaler``, whose scale the gradient
    was computed at: it is divided out first, and the scale updated once the gradient is known
    finite or not (``LossScaler.after_update``). ``Trainer`` applies every update with it.
    """
    undo = undo or StepUndo(optimizer)
    params = [p for _, p in named]
    device = result.loss.device
    if scaler is not None:
        scaler.unscale(result.grads)
    norm = total_norm([g for n, _ in named if (g := result.grads[n]) is not None]).to(device)
    # a gradient cast to a narrower weight dtype in the step could overflow where its norm did not
    rate = sgd_rate(optimizer) if all((g := result.grads[n]) is None or g.dtype == p.dtype for n, p in named) else None
    if rate is not None:
        # plain SGD: the sync before the step, so that a refused update is never stepped and a
        # bounded step needs no copy of the weights
        checked = torch.stack([result.loss.float(), norm.float(), result.valid_steps.float().to(device)]).tolist()
        reason = _refusal(*checked, True, "")
        if not reason and undo.take_bounded_step(rate, min(checked[1], clip_grad_norm or math.inf), params):
            overflow = _step(optimizer, undo, named, result.grads, norm, clip_grad_norm)
            return _record(result, checked[0], checked[1], started, _refusal(*checked, True, overflow), nonfinite,
                           scaler=scaler)
        if reason:
            return _record(result, checked[0], checked[1], started, reason, nonfinite, stepped=False, scaler=scaler)
    undo.save(params)
    overflow = _step(optimizer, undo, named, result.grads, norm, clip_grad_norm)
    # the weights' norm is finite exactly when they are, unless their magnitudes pass the square root
    # of the dtype's largest: all_finite, the exact test, tells those apart, run only then
    weights = total_norm(params).to(device)
    # the one host sync of an update (a second only when the weights' norm is not finite)
    loss_value, norm_value, valid, weights_value = torch.stack(
        [result.loss.float(), norm.float(), result.valid_steps.float().to(device), weights.float()]
    ).tolist()
    finite = math.isfinite(weights_value) or all_finite(params)
    reason = _refusal(loss_value, norm_value, valid, finite, overflow)
    if reason:
        undo.restore()
    # a bound for the next bounded step: the norm of the weights kept (not of a step undone)
    undo.bound = weights_value if math.isfinite(weights_value) and not reason else None
    return _record(result, loss_value, norm_value, started, reason, nonfinite, scaler=scaler)


def _record(result: UpdateResult, loss_value: float, norm_value: float, started: float, reason: str,
            nonfinite: NonFinite, stepped: bool = True, scaler: Optional[LossScaler] = None) -> UpdateRecord:
    """The update's record; a refused update (its step undone, or not ``stepped``) is skipped, or raised.
    Every update passes here once: float16's loss scale is updated here."""
    tolerated = reason == "no valid steps"  # skipped even under nonfinite="raise"
    if scaler is not None:
        reason, overflowed = scaler.after_update(reason, math.isfinite(norm_value))
        tolerated = tolerated or overflowed
    u = result.update
    if not reason:
        return UpdateRecord(u.start, u.loss_start, u.stop, loss_value, norm_value, time.perf_counter() - started,
                            k2=result.k2)
    if nonfinite == "raise" and not tolerated:
        raise NonFiniteError(
            f"{reason} at stream step {u.stop} (window [{u.start}, {u.stop})): loss {loss_value}, gradient "
            f"norm {norm_value}; {'the step was undone' if stepped else 'no step was taken'}: the weights and the "
            "optimizer's state are as before it"
        )
    return UpdateRecord(u.start, u.loss_start, u.stop, loss_value, norm_value, time.perf_counter() - started,
                        True, reason, result.k2)


def _step(optimizer: Any, undo: StepUndo, named: list[tuple[str, nn.Parameter]], grads: dict,
          norm: torch.Tensor, clip_grad_norm: Optional[float]) -> str:
    """One optimizer step on ``grads`` (clipped to ``clip_grad_norm``, without a host sync); the
    message of an overflow the step raised, else ""."""
    present = [g for name, _ in named if (g := grads[name]) is not None]
    if clip_grad_norm is not None and present:
        torch._foreach_mul_(present, (clip_grad_norm / (norm.double() + 1e-6)).clamp(max=1.0))
    for name, p in named:
        g = grads[name]
        p.grad = None if g is None else g.to(p.dtype)
    try:
        optimizer.step()
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            undo.restore()
            raise
        return str(exc)
    finally:
        optimizer.zero_grad(set_to_none=True)
    return ""


def _refusal(loss: float, norm: float, valid: float, finite_weights: bool, overflow: str) -> str:
    """Why an update's step may not stand ("" if it may)."""
    if not math.isfinite(loss):
        return "non-finite loss"
    if not math.isfinite(norm):
        return "non-finite gradient"
    if valid == 0:
        return "no valid steps"
    if overflow:
        return f"non-finite weights: the optimizer step overflowed ({overflow})"
    if not finite_weights:
        return "non-finite weights after the optimizer step"
    return ""
