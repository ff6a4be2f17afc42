"""What the engine requires of a model and a loss function, checked at every call.

``model(inputs[B, T, ...], state) -> (outputs[B, T, ...], new_state)`` and
``loss_fn(outputs, targets) -> [B, T]`` per-step losses. Errors name what was returned and what
was expected.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from . import state as st

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(outputs[B, T, ...], targets[B, T, ...]) -> [B, T]`` per-step losses."""
Metric = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], float]
"""``metric(outputs[B, T, ...], targets, mask) -> float`` over a whole split."""


def call_model(
    model: nn.Module, inputs: torch.Tensor, state: st.State, weights: Optional[dict[str, torch.Tensor]] = None
) -> tuple[torch.Tensor, st.State]:
    """``model(inputs, state)``, or with ``weights`` in place of its own, checked for one output per step."""
    result = model(inputs, state) if weights is None else functional_call(model, weights, (inputs, state))
    if not (isinstance(result, tuple) and len(result) == 2):
        length = f" of length {len(result)}" if isinstance(result, tuple) else ""
        raise TypeError(
            f"model(inputs, state) must return (outputs[B, T, ...], new_state); got {type(result).__name__}{length}"
        )
    outputs, new_state = result
    for leaf in pytree.tree_leaves(new_state):
        if not isinstance(leaf, (torch.Tensor, int, float, bool, type(None))):
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
    return losses


def masked_sum(losses: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum of the valid steps' losses and their count (both 0-d tensors, no host sync)."""
    if mask is None:
        return losses.sum(), losses.new_full((), float(losses.numel()))
    # where(), not a product: a masked step's loss may be non-finite (padding) and must not leak
    zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
    return torch.where(mask, losses, zero).sum(), mask.sum()
