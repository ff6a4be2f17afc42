"""Recurrent states as any nesting of tuples, lists, dicts and tensors.

Every helper maps over the tensor leaves of a state (``torch.utils._pytree``), so nn.LSTM's
``(h, c)``, a GRU's ``h`` and a user's dict of tensors are handled alike.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils import _pytree as pytree

State = Any
"""A tensor, or any nesting of tuples, lists and dicts of tensors, or None before a stream starts."""


def _flat(state: State) -> Optional[list[torch.Tensor]]:
    """The leaves of a tensor or a plain tuple or list of tensors (the states of nn.RNN/GRU/LSTM and
    most cells), else None: the common cases skip the pytree walk, which costs tens of microseconds
    per call on a small model's update."""
    if isinstance(state, torch.Tensor):
        return [state]
    if type(state) in (tuple, list) and all(isinstance(x, torch.Tensor) for x in state):
        return list(state)
    return None


def map_tensors(fn: Callable[[torch.Tensor], Any], state: State) -> State:
    """Apply ``fn`` to every tensor leaf of ``state``; other leaves are kept as they are."""
    flat = _flat(state)
    if flat is not None:
        return fn(state) if isinstance(state, torch.Tensor) else type(state)(fn(x) for x in flat)
    return pytree.tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, state)


def tensors(state: State) -> list[torch.Tensor]:
    """The tensor leaves of ``state``, in a fixed order."""
    flat = _flat(state)
    if flat is not None:
        return flat
    return [x for x in pytree.tree_leaves(state) if isinstance(x, torch.Tensor)]


def non_tensor_leaf(state: State) -> Any:
    """The first leaf of ``state`` that is neither a tensor, a number nor None (something the engine
    cannot detach, reset or save), or None if there is none."""
    if _flat(state) is not None:
        return None
    return next((leaf for leaf in pytree.tree_leaves(state)
                 if not isinstance(leaf, (torch.Tensor, int, float, bool, type(None)))), None)


def detach(state: State) -> State:
    """The state with every tensor cut from its graph (the ``repackage_hidden`` idiom)."""
    return map_tensors(torch.Tensor.detach, state)


def detach_requiring_grad(state: State) -> State:
    """Detached copies of the floating leaves that record gradients flowing into them."""

    def leaf(x: torch.Tensor) -> torch.Tensor:
        y = x.detach()
        return y.requires_grad_(True) if y.is_floating_point() or y.is_complex() else y

    return map_tensors(leaf, state)


def shapes(state: State) -> list[tuple[int, ...]]:
    """Shapes of the tensor leaves, to detect a state that changed size between calls."""
    return [tuple(x.shape) for x in tensors(state)]


def batch_dim(x: torch.Tensor, batch_size: int) -> int:
    """The dimension of a state tensor that indexes the B streams.

    nn.RNN/GRU/LSTM states are ``[layers * directions, B, H]`` (dimension 1); other states are taken
    as batch-first. A 3-D tensor whose first two sizes both equal B is read in the nn.RNN layout
    (dimension 1); pass a ``reset_fn`` for a batch-first 3-D state where that can happen. A tensor
    without a dimension of size B is rejected.
    """
    if x.dim() == 3 and x.shape[1] == batch_size:
        return 1
    if x.dim() >= 2 and x.shape[0] != batch_size and x.shape[1] == batch_size:
        return 1
    if x.dim() >= 1 and x.shape[0] == batch_size:
        return 0
    raise ValueError(
        f"cannot find the batch dimension (size {batch_size}) in a state tensor of shape "
        f"{tuple(x.shape)}; pass a reset function that knows the state's layout"
    )


def reset_rows(state: State, rows: torch.Tensor) -> State:
    """Zero the state of the streams where ``rows`` (a ``[B]`` bool tensor) is True.

    The result does not depend on the old state of those rows, so no gradient flows across the
    reset. A state of None stays None (a fresh stream's state).
    """
    if state is None:
        return None
    batch_size = rows.shape[0]

    def leaf(x: torch.Tensor) -> torch.Tensor:
        dim = batch_dim(x, batch_size)
        shape = [1] * x.dim()
        shape[dim] = batch_size
        keep = (~rows).to(device=x.device).reshape(shape)
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))

    return map_tensors(leaf, state)


def row_norms_squared(grads: Sequence[Optional[torch.Tensor]], leaves: Sequence[torch.Tensor], batch: int) -> torch.Tensor:
    """Per-row squared norm (float64, on the CPU) of a gradient with respect to a state, given as
    one gradient per tensor leaf (None: zero), the leaves taken together."""
    total = torch.zeros(batch, dtype=torch.float64)
    for g, leaf in zip(grads, leaves):
        if g is None:
            continue
        dim = batch_dim(leaf, batch)
        total += g.detach().movedim(dim, 0).reshape(batch, -1).double().pow(2).sum(dim=1).cpu()
    return total
