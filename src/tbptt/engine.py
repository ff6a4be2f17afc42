"""The engine: runs a model over B parallel streams under a TBPTT schedule, one gradient per update.

Work is done block by block: the steps of a block ``[P, T)`` are buffered until the update at T
closes it, then the block runs through the model in at most three calls (the old part of the window
when recomputing, then the new steps split where a later window will begin). Because the model only
sees segments whose boundaries the schedule fixes, how the stream is cut into ``feed`` calls changes
nothing, bit for bit.

Two strategies (``SEMANTICS.md``):

- ``recompute``: the window is run again from its entering state with the current weights; the
  gradient is the exact gradient of the truncated loss. The block's new steps are computed inside
  that run, so the state carried past T is the end of the window's run.
- ``stored``: each step runs forward once, under a snapshot of the weights of its block, and its
  activations are kept while a later window still covers them; a window's backward chains through
  those stored segments as they are (Williams & Peng's BPTT(h; h')). The snapshots keep an
  optimizer step from invalidating a graph that a later window will still backpropagate through.

With k1 >= k2 no window reaches into an earlier block and the two strategies are the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Optional

import torch
from torch import nn
from torch.func import functional_call

from . import state as st
from .schedule import TBPTT, Update

Strategy = Literal["recompute", "stored"]
STRATEGIES = ("recompute", "stored")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class UpdateResult:
    """What one update produced: its indices, its loss (a 0-d tensor) and one gradient per
    trainable parameter (None where the loss does not depend on it)."""

    update: Update
    loss: torch.Tensor
    grads: dict[str, Optional[torch.Tensor]]
    valid_steps: torch.Tensor


@dataclass
class _Chunk:
    start: int
    inputs: torch.Tensor
    targets: torch.Tensor
    mask: Optional[torch.Tensor]

    @property
    def stop(self) -> int:
        return self.start + self.inputs.shape[1]


@dataclass
class _Segment:
    """Stored activations of steps ``[start, stop)`` for the ``stored`` strategy."""

    start: int
    stop: int
    in_state: st.State  # leaves detached and recording gradient, so windows can chain through
    out_state: st.State  # with graph
    step_losses: torch.Tensor  # [B, stop - start], with graph
    mask: Optional[torch.Tensor]
    weights: dict[str, torch.Tensor]  # the snapshot of the block's weights this segment used


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")


def _check_batch(inputs: object, targets: object, mask: object) -> None:
    for name, value in (("inputs", inputs), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, T, ...]; got {type(value).__name__}")
        if value.dim() < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions [B, T, ...]; got shape {tuple(value.shape)}"
            )
    assert isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor)
    if inputs.shape[:2] != targets.shape[:2]:
        raise ValueError(
            f"inputs and targets must agree in batch and time [B, T]; got inputs "
            f"{tuple(inputs.shape[:2])} and targets {tuple(targets.shape[:2])}"
        )
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(inputs.shape[:2]):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"mask must be a [B, T] tensor matching inputs {tuple(inputs.shape[:2])}; got {shape}"
            )


class StreamEngine:
    """Carries B streams through a model under a schedule and yields one ``UpdateResult`` per update.

    The weights are never changed here: the caller applies each result (an optimizer step, or
    nothing) before asking for the next one.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        schedule: TBPTT,
        strategy: Strategy = "recompute",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, targets) -> [B, T]; got {loss_fn!r}")
        if not isinstance(schedule, TBPTT):
            raise TypeError(f"schedule must be a tbptt.TBPTT; got {type(schedule).__name__}")
        check_strategy(strategy)
        self.model = model
        self.loss_fn = loss_fn
        self.schedule = schedule
        self.strategy = strategy
        # stored activations only matter when windows reach into earlier blocks
        self._overlapping = strategy == "stored" and (
            schedule.k1 is not None and (schedule.k2 is None or schedule.k2 > schedule.k1)
        )
        self.forward_steps = 0
        self.backward_steps = 0
        self.reset()

    # ------------------------------------------------------------------------------------------
    def reset(self, initial_state: st.State = None) -> None:
        """End the streams without an update: the next feed starts a fresh stream."""
        self.position = 0  # steps received
        self.previous = 0  # P: where the open block starts
        self._states: dict[int, st.State] = {0: initial_state}
        self._chunks: list[_Chunk] = []
        self._segments: list[_Segment] = []
        self._batch_size: Optional[int] = None
        self._state_shapes: Optional[list[tuple[int, ...]]] = None

    @property
    def state(self) -> st.State:
        """The carried state at the start of the open block (detached)."""
        return self._states[self.previous]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------
    def feed(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        end_of_stream: bool = False,
    ) -> Iterator[UpdateResult]:
        """Append ``inputs[B, T, ...]``/``targets`` to the streams; yield each update they close.

        The generator computes each update lazily: apply a result before asking for the next.
        With ``end_of_stream`` the open block is cut short at the end of this data, its update (if
        any errors are left to inject) is yielded, and the streams are reset.
        """
        _check_batch(inputs, targets, mask)
        batch = inputs.shape[0]
        if self._batch_size is not None and batch != self._batch_size:
            raise ValueError(
                f"inputs have batch size {batch} but the open streams have {self._batch_size}; "
                "the streams carry one state per row, so call reset_state() before changing B"
            )
        self._batch_size = batch
        if inputs.shape[1] > 0:
            self._chunks.append(_Chunk(self.position, inputs, targets, mask))
            self.position += inputs.shape[1]
        while True:
            end = self.schedule.block_end(self.previous)
            if end is None or end > self.position:
                break
            result = self._close_block(end)
            if result is not None:
                yield result
        if end_of_stream:
            yield from self.finish()

    def finish(self) -> Iterator[UpdateResult]:
        """End the streams: cut the open block short at the last step received, yield its update
        (if any errors are left to inject), and reset."""
        if self.position > self.previous:
            result = self._close_block(self.position)
            if result is not None:
                yield result
        self.reset()

    # ------------------------------------------------------------------------------------------
    def _slice(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        parts = [c for c in self._chunks if c.start < stop and c.stop > start]
        xs, ys, ms = [], [], []
        any_mask = any(c.mask is not None for c in parts)
        for c in parts:
            a, b = max(start, c.start) - c.start, min(stop, c.stop) - c.start
            xs.append(c.inputs[:, a:b])
            ys.append(c.targets[:, a:b])
            if any_mask:
                m = c.mask[:, a:b] if c.mask is not None else torch.ones(
                    c.inputs.shape[0], b - a, dtype=torch.bool, device=c.inputs.device
                )
                ms.append(m.bool())
        cat = (lambda t: t[0]) if len(parts) == 1 else (lambda t: torch.cat(t, dim=1))
        return cat(xs), cat(ys), (cat(ms) if any_mask else None)

    def _forget_before(self, position: int) -> None:
        """Drop inputs, states and stored segments that no later window can reach."""
        kept: list[_Chunk] = []
        for c in self._chunks:
            if c.stop <= position:
                continue
            if c.start < position:
                a = position - c.start
                c = _Chunk(position, c.inputs[:, a:], c.targets[:, a:], None if c.mask is None else c.mask[:, a:])
            kept.append(c)
        self._chunks = kept
        self._states = {k: v for k, v in self._states.items() if k >= position or k == self.previous}
        self._segments = [s for s in self._segments if s.stop > position]

    def _call(
        self, inputs: torch.Tensor, state: st.State, weights: Optional[dict[str, torch.Tensor]] = None
    ) -> tuple[torch.Tensor, st.State]:
        if weights is None:
            result = self.model(inputs, state)
        else:
            result = functional_call(self.model, weights, (inputs, state))
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError(
                "model(inputs, state) must return (outputs[B, T, ...], new_state); got "
                f"{type(result).__name__}{'' if not isinstance(result, tuple) else f' of length {len(result)}'}"
            )
        outputs, new_state = result
        if not isinstance(outputs, torch.Tensor) or outputs.dim() < 2 or tuple(outputs.shape[:2]) != tuple(inputs.shape[:2]):
            got = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise ValueError(
                f"model outputs must be [B, T, ...] with the inputs' batch and time "
                f"{tuple(inputs.shape[:2])}; got {got}. A model must return one output per input step"
            )
        shapes = st.shapes(new_state)
        if self._state_shapes is None:
            self._state_shapes = shapes
        elif shapes != self._state_shapes:
            raise ValueError(
                f"the model's state changed shape between calls: {self._state_shapes} then {shapes}; "
                "a stream's state must keep its batch size (call reset_state() to start new streams)"
            )
        self.forward_steps += inputs.shape[1]
        return outputs, new_state

    def _step_losses(
        self, outputs: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        if mask is not None:
            # masked steps reach the loss cut from the graph: whatever the padding holds (even a
            # NaN target), the derivative of a masked step is never multiplied into the weights
            shaped = mask.reshape(mask.shape + (1,) * (outputs.dim() - 2))
            outputs = torch.where(shaped, outputs, outputs.detach())
        losses = self.loss_fn(outputs, targets)
        expected = tuple(targets.shape[:2])
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != expected:
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"loss_fn(outputs, targets) must return per-step losses [B, T] = {expected}; got "
                f"{got}. Use reduction='none' and average over any feature dimensions"
            )
        return losses

    @staticmethod
    def _masked_sum(losses: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            return losses.sum(), torch.tensor(float(losses.numel()), device=losses.device)
        # where(), not a product: a masked step's loss may be non-finite (padding) and must not leak
        return torch.where(mask, losses, torch.zeros((), dtype=losses.dtype, device=losses.device)).sum(), mask.sum()

    # ------------------------------------------------------------------------------------------
    def _close_block(self, clipped: int) -> Optional[UpdateResult]:
        previous = self.previous
        update = self.schedule.update(previous, stop=clipped)
        if update is None:
            # nothing left to inject (the stream ended before this block's window)
            return None
        if self._overlapping:
            result = self._stored_block(update)
        else:
            result = self._recomputed_block(update)
        self.previous = update.stop
        next_end = self.schedule.block_end(update.stop)
        reach = self.schedule.window_start(next_end) if next_end is not None else update.stop
        self._forget_before(min(reach, update.stop))
        self.backward_steps += update.window
        return result

    def _recomputed_block(self, update: Update) -> UpdateResult:
        previous, start, stop = self.previous, update.start, update.stop
        saved = self.schedule.saved_state_position(previous)
        cuts = sorted({start, previous, stop} | ({saved} if saved is not None and previous < saved < stop else set()))
        cuts = [c for c in cuts if c >= min(start, previous)]
        state = self._states[min(start, previous)]
        window_outputs: list[torch.Tensor] = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            x, _, _ = self._slice(a, b)
            if b <= start:
                # steps of a k1 > k2 block before its window only advance the state
                with torch.no_grad():
                    _, state = self._call(x, state)
            else:
                out, state = self._call(x, state)
                window_outputs.append(out)
            if b > previous:
                self._states[b] = st.detach(state)
        outputs = window_outputs[0] if len(window_outputs) == 1 else torch.cat(window_outputs, dim=1)
        _, targets, mask = self._slice(update.loss_start, stop)
        offset = update.loss_start - start
        losses = self._step_losses(outputs[:, offset:], targets, mask)
        total, count = self._masked_sum(losses, mask)
        loss = total / count.clamp_min(1)
        named = self.named_parameters()
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        return UpdateResult(update, loss.detach(), {n: g for (n, _), g in zip(named, grads)}, count)

    def _stored_block(self, update: Update) -> UpdateResult:
        previous, stop = self.previous, update.stop
        named = self.named_parameters()
        weights = {n: p.detach().clone().requires_grad_(True) for n, p in named}
        call_weights = dict(weights)
        call_weights.update(dict(self.model.named_buffers()))
        saved = self.schedule.saved_state_position(previous)
        cuts = sorted({previous, stop} | ({saved} if saved is not None and previous < saved < stop else set()))
        prior: st.State = self._segments[-1].out_state if self._segments else self._states[previous]
        for a, b in zip(cuts[:-1], cuts[1:]):
            x, y, m = self._slice(a, b)
            in_state = st.detach_requiring_grad(prior)
            out, out_state = self._call(x, in_state, call_weights)
            seg = _Segment(a, b, in_state, out_state, self._step_losses(out, y, m), m, weights)
            self._segments.append(seg)
            self._states[b] = st.detach(out_state)
            prior = out_state

        # backward through the window, newest segment first, chaining state gradients by hand
        window = [s for s in self._segments if s.start >= update.start]
        if not window or window[0].start != update.start:
            raise RuntimeError(f"internal: no stored segment starts at window start {update.start}")
        parts = []
        for seg in window:
            a = max(update.loss_start, seg.start) - seg.start
            if seg.start + a < seg.stop:
                m = None if seg.mask is None else seg.mask[:, a:]
                parts.append(self._masked_sum(seg.step_losses[:, a:], m))
            else:
                parts.append(None)
        count = sum(p[1] for p in parts if p is not None)
        denominator = count.clamp_min(1)
        loss = sum(p[0] for p in parts if p is not None) / denominator

        grads: dict[str, Optional[torch.Tensor]] = {n: None for n, _ in named}
        state_grads: Optional[list[torch.Tensor]] = None
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
            first = seg is window[0]
            in_leaves = [] if first else st.tensors(seg.in_state)
            targets = list(seg.weights.values()) + [t for t in in_leaves if t.requires_grad]
            got = torch.autograd.grad(outs, targets, outs_grad, retain_graph=True, allow_unused=True)
            for (n, _), g in zip(seg.weights.items(), got[: len(seg.weights)]):
                if g is not None:
                    grads[n] = g if grads[n] is None else grads[n] + g
            rest = iter(got[len(seg.weights):])
            state_grads = [next(rest) if t.requires_grad else None for t in in_leaves]
        return UpdateResult(update, loss.detach(), grads, count)


def truncated_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    schedule: TBPTT,
    state: st.State = None,
    mask: Optional[torch.Tensor] = None,
) -> list[dict[str, torch.Tensor]]:
    """The gradient of every update of ``schedule`` on one stream, all at the model's current weights.

    Returns one ``{parameter_name: gradient}`` per update of ``schedule.updates(T)``, in order
    (zeros for a parameter the update's loss does not reach). Neither the weights nor their
    ``.grad`` are changed. ``state`` is the state entering step 0 (None: the model's own start).
    """
    engine = StreamEngine(model, loss_fn, schedule, "recompute")
    engine.reset(initial_state=state)
    params = dict(engine.named_parameters())
    out = []
    for result in engine.feed(inputs, targets, mask, end_of_stream=True):
        out.append({n: torch.zeros_like(params[n]) if g is None else g for n, g in result.grads.items()})
    return out
