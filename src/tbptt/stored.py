"""Stored activations for the ``stored`` strategy (Williams & Peng's BPTT(h; h')).

Each step runs forward once, in a segment that starts from a detached copy of the previous
segment's state (so a segment can be dropped as soon as no window reaches it). The segment runs
with the model's own weights, and every weight autograd saves for the backward is saved as a view
of a snapshot of its block's weights (``WeightSnapshot``, a saved-tensors hook): an optimizer step
then cannot change or invalidate a graph that later windows still backpropagate through, and no
call pays for swapping the model's parameters. A window's backward goes segment by segment, newest
first, handing the gradient of each segment's entering state to the segment before it.

What a model must do for this: save what its backward needs the way autograd sees it (its own
operations, or ``ctx.save_for_backward`` in a custom ``autograd.Function``, as torch requires); a
weight stashed on ``ctx`` by hand would be read after the optimizer changed it. Weights and buffers
are copied when the block starts: a forward that edits its own weights in place (a clamp) before
using them is backpropagated with the values before the edit, and a tensor that is neither a
weight nor a buffer, changed in place after a segment saved it, is read as changed (autograd's
in-place check is off under the hook).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import state as st
from .contract import masked_sum
from .stream_state import SegmentEntry


@dataclass
class Segment:
    """Steps ``[start, stop)`` as first computed."""

    start: int
    stop: int
    in_state: st.State  # leaves detached and recording gradient, so windows can chain through
    out_state: st.State  # with graph
    step_losses: torch.Tensor  # [B, stop - start], with graph
    mask: Optional[torch.Tensor]
    weights: dict[str, torch.Tensor]  # the values of the block's weights this segment used (detached)
    random: dict  # the random generators' states and the model's mode when the segment ran
    leaves: dict[str, torch.Tensor]  # what the window's gradient is taken with respect to, by name


class WeightSnapshot:
    """The values of a block's weights, copied once, and a saved-tensors hook (``pack``) that
    saves any tensor on a weight's memory as the same view of the copy."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], others: list[torch.Tensor] = ()) -> None:
        """``named``: the trainable weights (``values`` holds their copies); ``others``: frozen
        weights and buffers, copied too, so that a later in-place change of one (a running
        statistic) cannot reach a backward that saved it."""
        self.params = dict(named)  # the weights themselves: what gradients are taken with respect to
        self._storages: dict[int, torch.UntypedStorage] = {}
        self.values: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in [*named, *(("", t) for t in others)]:
                key = p.untyped_storage().data_ptr()
                if key not in self._storages:  # weights sharing memory (tied, flattened) share a copy
                    self._storages[key] = p.untyped_storage().clone()
                if name:
                    self.values[name] = self._view(p, self._storages[key])

    @staticmethod
    def _view(t: torch.Tensor, storage: torch.UntypedStorage) -> torch.Tensor:
        return t.new_empty(0).set_(storage, t.storage_offset(), t.size(), t.stride())

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        # detached: a saved output kept with its grad_fn would hold the graph that holds it, a
        # reference cycle that keeps every segment's graph alive
        try:
            storage = self._storages.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError, TypeError):  # a tensor without plain memory
            return t.detach()
        return t.detach() if storage is None else self._view(t, storage)

    def hooks(self) -> "torch.autograd.graph.saved_tensors_hooks":
        """The context under which a segment's forward saves the snapshot instead of the weights."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def window_gradient(
    window: list[Segment], loss_start: int, names: list[str]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Optional[torch.Tensor]]]:
    """Loss (mean over the valid error steps from ``loss_start``), its step count and the gradient
    for each weight name, summed over the snapshots, through the window's stored segments."""
    parts: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = []
    for seg in window:
        a = max(loss_start, seg.start) - seg.start
        if seg.start + a < seg.stop:
            parts.append(masked_sum(seg.step_losses[:, a:], None if seg.mask is None else seg.mask[:, a:]))
        else:
            parts.append(None)
    count = sum(p[1] for p in parts if p is not None)
    denominator = count.clamp_min(1)
    loss = sum(p[0] for p in parts if p is not None) / denominator

    grads: dict[str, Optional[torch.Tensor]] = {n: None for n in names}
    state_grads: Optional[list[Optional[torch.Tensor]]] = None
    for seg, part in zip(reversed(window), reversed(parts)):
        outs: list[torch.Tensor] = []
        outs_grad: list[Optional[torch.Tensor]] = []
        if part is not None:
            outs.append(part[0] / denominator)
            outs_grad.append(None)
        if state_grads is not None:
            for leaf, g in zip(st.tensors(seg.out_state), state_grads):
                if leaf.requires_grad and g is not None:
                    outs.append(leaf)
                    outs_grad.append(g)
        if not outs:
            state_grads = None
            continue
        # the window's first segment starts from its entering state, a constant
        in_leaves = [] if seg is window[0] else st.tensors(seg.in_state)
        wanted = list(seg.leaves.values()) + [t for t in in_leaves if t.requires_grad]
        got = torch.autograd.grad(outs, wanted, outs_grad, retain_graph=True, allow_unused=True)
        for name, g in zip(seg.leaves, got[: len(seg.leaves)]):
            if g is not None:
                grads[name] = g if grads[name] is None else grads[name] + g
        rest = iter(got[len(seg.leaves):])
        state_grads = [next(rest) if t.requires_grad else None for t in in_leaves]
    return loss, count, grads


def describe(segments: list[Segment]) -> tuple[list[dict[str, torch.Tensor]], list[SegmentEntry]]:
    """What rebuilds the segments: the distinct weight snapshots, and per segment its steps, its
    entering state, which snapshot it used and the random state and mode it ran in (dropout
    draws the same masks again). A graph is not saved; it is recomputed."""
    snapshots: list[dict[str, torch.Tensor]] = []
    index: dict[int, int] = {}
    entries = []
    for seg in segments:
        if id(seg.weights) not in index:
            index[id(seg.weights)] = len(snapshots)
            snapshots.append({n: w.detach() for n, w in seg.weights.items()})
        entries.append(SegmentEntry(seg.start, seg.stop, st.detach(seg.in_state), index[id(seg.weights)], seg.random))
    return snapshots, entries
