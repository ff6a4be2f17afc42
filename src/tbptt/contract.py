"""What the engine requires of a model and a loss function, checked at every call.

``model(inputs[B, T, ...], state) -> (outputs[B, T, ...], new_state)`` and
``loss_fn(outputs, targets) -> [B, T]`` per-step losses. Errors name what was returned and what
was expected.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import torch
from torch import nn
from torch.func import functional_call

from . import state as st

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(outputs[B, T, ...], targets[B, T, ...]) -> [B, T]`` per-step losses."""
Metric = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], float]
"""``metric(outputs[B, T, ...], targets, mask) -> float`` over a whole split."""


def call_model(
    model: nn.Module, inputs: torch.Tensor, state: st.State, weights: Optional[dict[str, torch.Tensor]] = None
) -> tuple[torch.Tensor, st.State]:
    """``model(inputs, state)``, or with ``weights`` in place of its own, checked for one output per step."""
    try:
        result = model(inputs, state) if weights is None else functional_call(model, weights, (inputs, state))
    except RuntimeError as exc:
        mismatch = _dtype_mismatch(model, inputs, exc)
        if mismatch:
            raise TypeError(mismatch) from exc
        raise
    if not (isinstance(result, tuple) and len(result) == 2):
        length = f" of length {len(result)}" if isinstance(result, tuple) else ""
        raise TypeError(
            f"model(inputs, state) must return (outputs[B, T, ...], new_state); got {type(result).__name__}{length}"
        )
    outputs, new_state = result
    leaf = st.non_tensor_leaf(new_state)
    if leaf is not None:
        raise TypeError(
            f"the model's state holds a {type(leaf).__name__}, which the engine cannot see into to "
            "detach, reset or save; return the state as a tensor or a tuple/list/dict of tensors "
            "(or register the class with torch.utils._pytree)"
        )
    if not isinstance(outputs, torch.Tensor) or outputs.dim() < 2 or tuple(outputs.shape[:2]) != tuple(inputs.shape[:2]):
        got = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise ValueError(
            f"model outputs must be [B, T, ...] with the inputs' batch and time {tuple(inputs.shape[:2])}; "
            f"got {got}. A model must return one output per input step"
        )
    return outputs, new_state


_DTYPE_WORDS = re.compile(r"dtype|scalar type|type torch\.|Float|Double|Half|BFloat16|Long|Int\b|Byte|Bool")


def _dtype_mismatch(model: nn.Module, inputs: torch.Tensor, exc: Exception) -> str:
    """What to change when ``model`` failed on ``inputs`` of another dtype than its weights ("" when
    that is not the failure)."""
    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if weights is None or inputs.dtype == weights or not _DTYPE_WORDS.search(str(exc)):
        return ""
    fix = (f"convert the inputs (inputs.to({weights})) or the model (model.to({inputs.dtype})) so that they agree"
           if inputs.is_floating_point() or inputs.is_complex() else
           f"convert the inputs (inputs.to({weights})), or, if they are indices, look them up with an nn.Embedding first")
    return (f"the model failed on inputs of dtype {inputs.dtype} while its weights are {weights} "
            f"({str(exc).splitlines()[0]}); {fix}")


def require_gradient(loss: torch.Tensor, outputs: Optional[torch.Tensor], trainable: int) -> None:
    """Raise a ``TypeError`` saying what cut the graph unless an update's ``loss`` can be
    differentiated: ``outputs`` are the model's (None when not at hand); ``trainable`` counts the
    parameters that require a gradient."""
    if loss.requires_grad:
        return
    if not torch.is_grad_enabled():
        why = "training ran with gradients disabled (under torch.no_grad() or torch.inference_mode()); call it outside"
    elif trainable == 0:
        why = "the model has no parameter that requires a gradient; unfreeze some (requires_grad_(True))"
    elif outputs is not None and outputs.requires_grad:
        why = ("loss_fn(outputs, targets) returned losses without a gradient: compute them from outputs with torch "
               "operations, not .item(), .detach(), .numpy() or under torch.no_grad()")
    else:
        why = ("the model's outputs carry no gradient: its forward cuts the graph (.detach(), torch.no_grad(), "
               ".numpy()) or does not use its parameters")
    raise TypeError(f"the update's loss does not depend on the weights, so there is nothing to train: {why}")


def check_state_rows(model: nn.Module, state: st.State, rows: int) -> None:
    """Raise a ``ValueError`` if no tensor of the state a model returned has a dimension of size
    ``rows`` (B, the streams): the mark of a time-first model (an nn.LSTM without
    ``batch_first=True``) fed batch-first inputs, which reads the time axis as the batch."""
    leaves = st.tensors(state)
    # recurrent states are at least 2-D ([B, H], [layers, B, H]); a scalar state (a step count) is left alone
    if not any(t.dim() >= 2 for t in leaves) or any(rows in t.shape for t in leaves):
        return
    time_first = [name or type(model).__name__ for name, m in model.named_modules()
                  if isinstance(m, nn.RNNBase) and not m.batch_first]
    hint = (f"; {', '.join(time_first)} {'is' if len(time_first) == 1 else 'are'} time-first (batch_first=False): "
            "build with batch_first=True" if time_first else "; is the model time-first?")
    raise ValueError(
        f"the model's state has no dimension of size B={rows} (the streams): shapes {st.shapes(state)}. The "
        f"engine feeds batch-first inputs [B, T, ...], and a time-first model reads T as the batch{hint} "
        "(or transpose inside forward)"
    )


def step_losses(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-step losses ``[B, T]``; masked steps reach the loss cut from the graph."""
    if mask is not None:
        # whatever the padding holds (even a NaN target), the derivative of a masked step is
        # never multiplied into the weights
        shaped = mask.reshape(mask.shape + (1,) * (outputs.dim() - 2))
        outputs = torch.where(shaped, outputs, outputs.detach())
    losses = loss_fn(outputs, targets)
    expected = tuple(targets.shape[:2])
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != expected:
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn(outputs, targets) must return per-step losses [B, T] = {expected}; got {got}. "
            "Use reduction='none' and average over any feature dimensions"
        )
    if outputs.requires_grad and not losses.requires_grad:
        require_gradient(losses, outputs, 1)
    return losses


def masked_sum(losses: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum of the valid steps' losses and their count (both 0-d tensors, no host sync)."""
    if mask is None:
        return losses.sum(), losses.new_full((), float(losses.numel()))
    # where(), not a product: a masked step's loss may be non-finite (padding) and must not leak
    zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
    return torch.where(mask, losses, zero).sum(), mask.sum()
