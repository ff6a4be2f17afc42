"""The measurement behind ``AdaptiveTBPTT``: how the gradient of an update's loss with respect to the
recurrent state shrinks with the distance before the block, measured during training.

The update's window is run again from ``max_k2`` steps before its end, at the current weights, in
model calls that end at the measured positions (``stride`` steps apart, counted back from the
block's start); one backward pass of the sum of the block's errors gives the gradient with respect
to the state at each of them, whose per-row norms (the probe's, ``tbptt.diagnostics``) are summed
over the rows. Rows are independent streams, so the sums over the rows of several processes add up
to those of one process holding them all.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import state as st

Run = Callable[[int, int, st.State], tuple[torch.Tensor, st.State]]
"""``run(a, b, state) -> (outputs, state)``: steps ``[a, b)`` from ``state``, resets applied."""


def measured_positions(start: int, block: int, stride: int) -> list[int]:
    """The positions ``block, block - stride, ...`` down to ``start``, nearest the block first."""
    return list(range(block, start - 1, -stride))


def lag_sums(
    run: Run,
    block_loss: Callable[[torch.Tensor], torch.Tensor],
    cuts: list[int],
    positions: list[int],
    entering: st.State,
    batch: int,
) -> Optional[torch.Tensor]:
    """Per measured position (in the order given), the sum over the rows of the norm of the gradient
    of ``block_loss(outputs)`` with respect to the state there; None if no state there has one.

    ``cuts``: the model-call boundaries from the window's start (``cuts[0]``, where ``entering`` is the
    state) to its end, every measured position among them."""
    kept: dict[int, st.State] = {cuts[0]: st.detach_requiring_grad(entering)}
    state = kept[cuts[0]]
    outputs = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        out, state = run(a, b, state)
        outputs.append(out)
        kept[b] = state
    groups = [[t for t in st.tensors(kept[p]) if t.requires_grad] for p in positions]
    if not any(groups):
        return None
    loss = block_loss(torch.cat(outputs, dim=1))
    sums = torch.zeros(len(positions), dtype=torch.float64)
    if not loss.requires_grad:  # every error masked: nothing flows back
        return sums
    flat = [t for group in groups for t in group]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    offset = 0
    for i, group in enumerate(groups):
        sums[i] = st.row_norms_squared(grads[offset : offset + len(group)], group, batch).sqrt().sum()
        offset += len(group)
    return sums


def measured_curve(
    run: Run,
    block_loss: Callable[[torch.Tensor], torch.Tensor],
    cuts_for: Callable[[list[int]], list[int]],
    start: int,
    block: int,
    stride: int,
    entering: st.State,
    batch: int,
    combine: Callable[[torch.Tensor], torch.Tensor],
) -> Optional[list[float]]:
    """The mean over the rows (of every process, through ``combine``, which sums) of the state
    gradient's norm at ``block, block - stride, ...`` down to ``start`` (not at ``start`` when the
    state there is None, a fresh stream's); ``cuts_for(positions)``: the model calls' boundaries."""
    positions = measured_positions(start, block, stride)
    if entering is None:
        positions = [p for p in positions if p > start]
    with torch.enable_grad():
        sums = lag_sums(run, block_loss, cuts_for(positions), positions, entering, batch)
    if sums is None:
        return None
    combined = combine(torch.cat([sums, torch.tensor([float(batch)], dtype=torch.float64)]))
    return (combined[:-1] / combined[-1]).tolist()
