"""Gradient checkpointing of a window (Gruslys et al. 2016): the window is cut into segments whose
inner activations are dropped after the forward pass and recomputed during backward, so memory
holds the segments' boundaries instead of every step's activations. The gradient is the same."""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

from . import state as st

Segments = Optional[Union[int, str]]
"""How many checkpointed segments a window is cut into: an int, ``"sqrt"`` or None (none)."""


def check_segments(value: object) -> None:
    if value is not None and value != "sqrt" and not (
        isinstance(value, int) and not isinstance(value, bool) and value >= 1
    ):
        raise ValueError(f"checkpoint_segments must be a positive int, 'sqrt' or None; got {value!r}")


def segment_cuts(segments: Segments, start: int, stop: int) -> list[int]:
    """The inner positions where the window ``[start, stop)`` is cut."""
    if segments is None:
        return []
    length = stop - start
    if segments == "sqrt":
        # sqrt(L) segments, but none shorter than ~32 steps: a fused call's fixed cost would
        # otherwise outweigh the memory it saves (measured in benchmarks/README.md)
        count = min(math.ceil(math.sqrt(length)), max(1, length // 32))
    else:
        assert isinstance(segments, int)
        count = segments
    count = max(1, min(count, length))
    return [start + round(i * length / count) for i in range(1, count)]


def checkpointed_call(
    call: Callable[[torch.Tensor, st.State], tuple[torch.Tensor, st.State]], inputs: torch.Tensor, state: st.State
) -> tuple[torch.Tensor, st.State]:
    """``call(inputs, state)`` whose inner activations are recomputed during backward: only the
    outputs and the state at the segment's end are kept."""
    leaves, spec = pytree.tree_flatten(state)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    out_spec: list = []

    def run(x: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        full = list(leaves)
        for i, t in zip(where, tensors):
            full[i] = t
        out, new_state = call(x, pytree.tree_unflatten(full, spec))
        new_leaves, new_spec = pytree.tree_flatten(new_state)
        out_spec[:] = [new_spec]
        return (out, *new_leaves)

    result = checkpoint(run, inputs, *[leaves[i] for i in where], use_reentrant=False)
    return result[0], pytree.tree_unflatten(list(result[1:]), out_spec[0])
