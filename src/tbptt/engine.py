"""The engine: runs a model over B parallel streams under a TBPTT schedule, one gradient per update.

Work is done block by block: the steps of a block ``[P, T)`` are buffered until the update at T
closes it, then the block runs through the model in at most three calls (the old part of the window
when recomputing, then the new steps split where a later window will begin), plus one more at each
step where a row resets. Because the model only sees segments whose boundaries the schedule and the
data fix, how the stream is cut into ``feed`` calls changes nothing, bit for bit.

Two strategies (``SEMANTICS.md``):

- ``recompute``: the window is run again from its entering state with the current weights; the
  gradient is the exact gradient of the truncated loss. The block's new steps are computed inside
  that run, so the state carried past T is the end of the window's run.
- ``stored``: each step runs forward once and its activations are kept while a later window still
  covers them (``stored.py``); a window's backward goes through them as they are.

With k1 >= k2 no window reaches into an earlier block and the two strategies are the same code.

The schedule is followed through its plan (``schedule.Plan``): TBPTT's is index arithmetic; ARTBP's
draws its windows from a ``torch.Generator`` the engine owns (seeded from torch's random generator,
saved with the streams), and its steps before a block run one per call so that the gradient through
each can be compensated (``compensation.py``); AdaptiveTBPTT's holds the k2 chosen so far, from the
measurements the engine makes at the updates it names (``lagscan.py``).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Generator, Iterator, Literal, Optional

import torch
from torch import nn

from . import state as st
from .adaptive import AdaptivePlan
from .artbp import ARTBP
from .checkpointing import Segments, check_segments, checkpointed_call, segment_cuts
from .compensation import run_compensated, uniforms
from .contract import LossFn, call_model, check_state_rows, masked_sum, require_gradient, step_losses
from .lagscan import measured_curve
from .schedule import Plan, Update
from .schedules import Schedule, check_schedule, reaches_earlier_blocks
from .steps import StepBuffer, Steps, check_steps, reset_positions
from .stored import Segment, WeightSnapshot, describe, window_gradient
from .saved import CheckpointError
from .stream_state import StreamState
from .validate import one_of

Strategy = Literal["recompute", "stored"]
STRATEGIES = ("recompute", "stored")
ResetFn = Callable[[object, torch.Tensor], object]
"""``reset_fn(state, rows[B] bool) -> state`` with the rows' states reset and cut from the graph."""


@dataclass
class UpdateResult:
    """What one update produced: its indices, its loss (a 0-d tensor), one gradient per trainable
    parameter (None where the loss does not depend on it), the count of valid error steps, and the
    window it was given (``k2``: TBPTT's k2, None for n; ARTBP's L drawn; AdaptiveTBPTT's k2 in force)."""

    update: Update
    loss: torch.Tensor
    grads: dict[str, Optional[torch.Tensor]]
    valid_steps: torch.Tensor
    k2: Optional[int] = None
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list, repr=False)
    """The trainable parameters the gradient is for, by name, in the order of ``grads``."""


class Updates(Iterator[UpdateResult]):
    """The updates an engine's received steps close, each computed when asked for (``next``).

    Stopping early is allowed: ``close()`` (or leaving a ``with`` block) keeps the steps the
    updates not made need, copied out of the caller's tensors; the engine holds them as pending.
    """

    def __init__(self, run: Generator[UpdateResult, None, None], keep: Callable[[], None]) -> None:
        self._run, self._keep = run, keep

    def __next__(self) -> UpdateResult:
        return next(self._run)

    def close(self) -> None:
        self._run.close()
        self._keep()  # also when no update was asked for (the generator never started)

    def __enter__(self) -> "Updates":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamEngine:
    """Carries B streams through a model under a schedule and yields one ``UpdateResult`` per update.

    The weights are never changed here: the caller applies each result (an optimizer step, or
    nothing) before asking for the next one.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        schedule: Schedule,
        strategy: Strategy = "recompute",
        reset_fn: Optional[ResetFn] = None,
        checkpoint_segments: Segments = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, targets) -> [B, T]; got {loss_fn!r}")
        check_schedule(schedule)
        one_of(strategy, "strategy", STRATEGIES)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator (ARTBP's draws) or None; "
                            f"got {type(generator).__name__}")
        check_segments(checkpoint_segments)
        if isinstance(schedule, ARTBP) and strategy == "stored":
            raise ValueError(
                f"{schedule} needs strategy='recompute': its compensation makes the update an unbiased estimate of "
                "the gradient at the current weights, which windows stored under older weights are not; and "
                "its windows, drawn anew for each update, would need every step kept as its own segment"
            )
        self.reset_fn = reset_fn or st.reset_rows
        self.checkpoint_segments = checkpoint_segments
        self.model = model
        self.loss_fn = loss_fn
        self.schedule = schedule
        self.strategy = strategy
        # stored activations only matter when windows reach into earlier blocks
        self._overlapping = strategy == "stored" and reaches_earlier_blocks(schedule)
        if self._overlapping and checkpoint_segments is not None:
            raise ValueError(
                f"checkpoint_segments={checkpoint_segments!r} recomputes activations, which {schedule} with "
                "strategy='stored' keeps by definition; use strategy='recompute' to checkpoint its windows"
            )
        # ARTBP's draws: seeded from torch's generator, so that torch.manual_seed reproduces a run
        self.generator: Optional[torch.Generator] = generator
        if generator is None and isinstance(schedule, ARTBP):
            self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        self.plan = schedule.plan(None if self.generator is None else uniforms(self.generator))
        self.combine: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums
        """How a measurement's sums over this process's rows become sums over all rows (data-parallel
        training sums them over the ranks)."""
        self.autocast: Callable[[], ContextManager[Any]] = nullcontext
        """The context every call of the model runs in (``Trainer(precision=...)`` sets ``torch.autocast``)."""
        self.forward_steps = 0
        self.backward_steps = 0
        self.measure_seconds = 0.0  # CPU seconds spent measuring (AdaptiveTBPTT)
        self.measure_steps = 0  # steps run forward (and backward) to measure
        self.reset()

    # ------------------------------------------------------------------------------------------
    def reset(self, initial_state: st.State = None) -> None:
        """End the streams without an update: the next feed starts a fresh stream."""
        self.plan.reset(getattr(self, "position", 0))
        self.position = 0  # steps received
        self.previous = 0  # P: where the open block starts
        self._states: dict[int, st.State] = {0: initial_state}
        self._steps = StepBuffer()
        self._segments: list[Segment] = []
        self._batch_size: Optional[int] = None
        self._state_shapes: Optional[list[tuple[int, ...]]] = None
        self._ending = False  # the streams end after the steps received; their last updates are pending
        self._borrowed: Optional[int] = None  # steps from here on are still the caller's tensors

    @property
    def overlapping(self) -> bool:
        """Whether activations are kept across updates (``stored`` with windows reaching into
        earlier blocks)."""
        return self._overlapping

    @property
    def state(self) -> st.State:
        """The carried state at the start of the open block (detached)."""
        return self._states[self.previous]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def state_dict(self) -> dict:
        """The streams as they stand (a ``StreamState`` as plain data): position, carried states, the
        open block's buffered steps and, for ``stored``, the weight snapshots and entering states of
        the kept activations (which ``load_state_dict`` recomputes, bit for bit, instead of saving a
        graph)."""
        self._own_received()
        snapshots, segments = describe(self._segments)
        plan = {"plan": self.plan.state_dict(), "measure_steps": self.measure_steps}
        if self.generator is not None:
            plan["generator"] = self.generator.get_state()
        return StreamState(
            str(self.schedule), self.strategy, self.position, self.previous, dict(self._states),
            list(self._steps.parts), sorted(self._steps.resets_at), self._batch_size, self._state_shapes,
            self.forward_steps, self.backward_steps, snapshots, segments, self._ending, plan,
        ).to_dict()

    def load_state_dict(self, saved: Any) -> None:
        """Continue the streams saved by ``state_dict``, every field checked first: a missing,
        mistyped or impossible one, or streams of another schedule or strategy, is a
        ``CheckpointError`` naming it, and the engine is left as it was."""
        streams = StreamState.from_dict(saved)
        for key, mine in (("schedule", str(self.schedule)), ("strategy", self.strategy)):
            if getattr(streams, key) != mine:
                raise CheckpointError(
                    f"the saved streams were run with {key} {getattr(streams, key)!r}, this engine uses "
                    f"{mine!r}; resume with the same {key}"
                )
        plan = self._saved_plan(streams.plan)
        streams.check_resumable(min(plan.reach(streams.previous), streams.previous), self._overlapping,
                                {n: tuple(p.shape) for n, p in self.named_parameters()})
        self.reset()
        self.position, self.previous = streams.position, streams.previous
        self._states = dict(streams.states)
        for chunk in streams.chunks:  # reset positions are found again from the flags
            self._steps.append(chunk)
        self._batch_size, self._state_shapes = streams.batch_size, streams.state_shapes
        self._ending = streams.ending
        snapshots = [{n: w.clone().requires_grad_(True) for n, w in snap.items()} for snap in streams.snapshots]
        try:
            with torch.enable_grad():
                for seg in streams.segments:
                    self._segments.append(self._run_segment(seg.start, seg.stop, seg.in_state,
                                                            snapshots[seg.weights], seg.random))
        except (RuntimeError, ValueError, TypeError, KeyError) as exc:
            self.reset()
            raise CheckpointError(f"checkpoint field engine.segments could not be run again: {exc}") from exc
        # rebuilding is not new work
        self.forward_steps, self.backward_steps = streams.forward_steps, streams.backward_steps
        self.load_plan(streams.plan)

    def _saved_plan(self, saved: dict) -> Plan:
        """A plan holding the saved draws and choices, to check them before anything is changed."""
        plan = self.schedule.plan(None if self.generator is None else uniforms(torch.Generator()))
        try:
            plan.load_state_dict(saved.get("plan", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint field engine.plan.plan does not hold {self.schedule}'s draws and "
                                  f"choices ({type(exc).__name__}: {exc})") from None
        if self.generator is not None:
            if "generator" not in saved:
                raise CheckpointError(f"checkpoint field engine.plan.generator is missing: {self.schedule} draws from it")
            try:
                torch.Generator().set_state(saved["generator"])
            except (RuntimeError, TypeError) as exc:
                raise CheckpointError(f"checkpoint field engine.plan.generator is not a generator's state: {exc}") from None
        return plan

    def load_plan(self, saved: dict) -> None:
        """Continue the draws and choices saved with the streams (``state_dict()["plan"]``)."""
        self.plan.load_state_dict(saved.get("plan", {}))
        self.measure_steps = int(saved.get("measure_steps", 0))
        if self.generator is not None:
            if "generator" not in saved:
                raise ValueError(f"the saved streams hold no random state for {self.schedule}'s draws")
            self.generator.set_state(saved["generator"])

    # ------------------------------------------------------------------------------------------
    def feed(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        end_of_stream: bool = False,
        resets: Optional[torch.Tensor] = None,
    ) -> "Updates":
        """Append ``inputs[B, T, ...]``/``targets`` to the streams; return the updates they close.

        ``mask[B, T]`` (bool) marks valid steps; ``resets[B, T]`` (bool) marks where a new sequence
        starts in a row: that row's state is reset before the step and no gradient crosses it.

        The steps are received at once; each update is computed lazily, when asked for: apply a
        result before asking for the next. A caller may stop asking at any update (a time budget);
        the updates not made stay ``pending`` and ``updates()``, or the next ``feed``, makes them
        first. With ``end_of_stream`` the open block is cut short at the end of this data, its
        update (if any errors are left to inject) is the last one, and the streams are then reset.
        """
        self.receive(inputs, targets, mask, end_of_stream, resets)
        return self.updates()

    def receive(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        end_of_stream: bool = False,
        resets: Optional[torch.Tensor] = None,
    ) -> None:
        """Append steps to the streams without computing anything (``feed`` without its updates)."""
        check_steps(inputs, targets, mask, resets)
        if self._ending:
            raise ValueError(
                "the streams were ended (end_of_stream) with updates still pending; make them first "
                "(Trainer.train_pending, StreamEngine.updates) or drop them (reset_state(flush=False))"
            )
        batch = inputs.shape[0]
        if self._batch_size is not None and batch != self._batch_size:
            raise ValueError(
                f"inputs have batch size {batch} but the open streams have {self._batch_size}; "
                "the streams carry one state per row, so call reset_state() before changing B"
            )
        self._batch_size = batch
        if self._borrowed is None:
            self._borrowed = self.position
        self._steps.append(Steps(self.position, inputs, targets, mask, resets))
        self.position += inputs.shape[1]
        self._ending = bool(end_of_stream)

    @property
    def pending(self) -> bool:
        """Whether the steps received close updates that were not asked for yet."""
        end = self.plan.block_end(self.previous)
        return self._ending or (end is not None and end <= self.position)

    def updates(self) -> "Updates":
        """The updates the steps received close (those pending first), computed as asked for."""
        return Updates(self._close_ready(), self._own_received)

    def _close_ready(self) -> Iterator[UpdateResult]:
        try:
            while True:
                end = self.plan.block_end(self.previous)
                if end is None or end > self.position:
                    break
                result = self._close_block(end)
                if result is not None:
                    yield result
        finally:
            self._own_received()
        if self._ending:
            yield from self._end()

    def _own_received(self) -> None:
        # the steps still waiting for their block are copied out of the caller's tensors, which
        # may be reused (a refilled buffer) or be much larger than what is kept
        if self._borrowed is not None:
            self._steps.own_from(self._borrowed)
            self._borrowed = None

    def forward(
        self, inputs: torch.Tensor, state: st.State = None, resets: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, st.State]:
        """Run the model over ``inputs[B, T, ...]`` from ``state`` with the streams' reset rules, as
        training would, but apart from the training streams (evaluation, prediction). Call it under
        ``torch.no_grad()`` to keep no graph."""
        if resets is not None:
            check_steps(inputs, inputs, None, resets)
        starts = reset_positions(resets)
        bounds = [0, *[p for p in starts if p > 0], inputs.shape[1]]
        outputs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a in starts and state is not None:
                assert resets is not None
                state = self.reset_fn(state, resets[:, a])
            with self.autocast():
                out, state = call_model(self.model, inputs[:, a:b], state)
            outputs.append(out)
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), state

    def finish(self) -> Iterator[UpdateResult]:
        """End the streams: make the updates still pending, cut the open block short at the last
        step received, yield its update (if any errors are left to inject), and reset."""
        self._ending = True
        yield from self._close_ready()

    def _end(self) -> Iterator[UpdateResult]:
        result = self._close_block(self.position) if self.position > self.previous else None
        try:
            if result is not None:
                yield result
        finally:  # the stream's last update was handed over (or there was none): the streams end
            self.reset()

    # ------------------------------------------------------------------------------------------
    def _cuts(self, start: int, stop: int, *positions: Optional[int]) -> list[int]:
        """Model-call boundaries in [start, stop): the given positions and every reset."""
        inner = {p for p in positions if p is not None and start < p < stop}
        inner.update(self._steps.resets_between(start, stop))
        return [start, *sorted(inner), stop]

    def _enter(self, position: int, state: st.State) -> st.State:
        """The state entering step ``position``: reset in the rows where a sequence starts there."""
        rows = self._steps.rows_reset_at(position)
        return state if rows is None or state is None else self.reset_fn(state, rows)

    def _forget_before(self, position: int) -> None:
        """Drop inputs, states and stored segments that no later window can reach."""
        self._steps.forget_before(position)
        self._states = {k: v for k, v in self._states.items() if k >= position or k == self.previous}
        self._segments = [s for s in self._segments if s.stop > position]

    def _call(
        self, inputs: torch.Tensor, state: st.State, weights: Optional[dict[str, torch.Tensor]] = None
    ) -> tuple[torch.Tensor, st.State]:
        with self.autocast():
            outputs, new_state = call_model(self.model, inputs, state, weights)
        shapes = st.shapes(new_state)
        if self._state_shapes is None:
            check_state_rows(self.model, new_state, inputs.shape[0])
            self._state_shapes = shapes
        elif shapes != self._state_shapes:
            raise ValueError(
                f"the model's state changed shape between calls: {self._state_shapes} then {shapes}; "
                "a stream's state must keep its batch size (call reset_state() to start new streams)"
            )
        self.forward_steps += inputs.shape[1]
        return outputs, new_state

    # ------------------------------------------------------------------------------------------
    def _close_block(self, clipped: int) -> Optional[UpdateResult]:
        previous = self.previous
        update = self.plan.update(previous, stop=clipped)
        if update is None:
            # nothing left to inject (the stream ended before this block's window)
            return None
        if self._overlapping:
            result = self._stored_block(update)
        else:
            result = self._recomputed_block(update)
        result.k2 = self.plan.window_length(update)
        if isinstance(self.plan, AdaptivePlan):
            self._measure(self.plan, update)
        self.plan.closed(update)
        self.previous = update.stop
        self._forget_before(min(self.plan.reach(update.stop), update.stop))
        self.backward_steps += update.window
        return result

    def _recomputed_block(self, update: Update) -> UpdateResult:
        previous, start, stop = self.previous, update.start, update.stop
        first = min(start, previous)
        # no cut at P when the window starts before it: the state there is kept already (also when
        # a later window starts there), and every extra call costs a fused kernel's fixed overhead
        saved = [p for p in self.plan.starts_in(previous, stop) if p > previous]
        # ARTBP: the gradient through the state at each step before the block is multiplied by 1/q,
        # so those steps run apart from the block's
        factor = 1 / self.schedule.q if isinstance(self.schedule, ARTBP) and self.schedule.q > 0 else None
        if factor is not None:
            saved.append(previous)
        cuts = self._cuts(first, stop, start, *saved, *segment_cuts(self.checkpoint_segments, start, stop))
        state = self._states[first]
        window_outputs: list[torch.Tensor] = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            x = self._steps.slice(a, b).inputs
            state = self._enter(a, state)
            if b <= start:
                # steps of a k1 > k2 block before its window only advance the state
                with torch.no_grad():
                    _, state = self._call(x, state)
            elif factor is not None and b <= previous:
                out, state = run_compensated(self._call, x, state, factor)
                window_outputs.append(out)
            elif self.checkpoint_segments is not None:
                out, state = checkpointed_call(self._call, x, state)
                window_outputs.append(out)
            else:
                out, state = self._call(x, state)
                window_outputs.append(out)
            if b > previous:
                self._states[b] = st.detach(state)
        outputs = window_outputs[0] if len(window_outputs) == 1 else torch.cat(window_outputs, dim=1)
        errors = self._steps.slice(update.loss_start, stop)
        losses = step_losses(self.loss_fn, outputs[:, update.loss_start - start :], errors.targets, errors.mask)
        total, count = masked_sum(losses, errors.mask)
        loss = total / (count if errors.mask is None else count.clamp_min(1))  # unmasked: count >= 1
        named = self.named_parameters()
        require_gradient(loss, outputs, len(named))
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        return UpdateResult(update, loss.detach(), {n: g for (n, _), g in zip(named, grads)}, count, params=named)

    def _measure(self, plan: AdaptivePlan, update: Update) -> None:
        """If the plan measures this update, measure the state gradient's decay (``lagscan.py``) at the
        current weights and let the plan choose k2 from it."""
        start = plan.measures(update)
        if start is None:
            return
        started = time.process_time()
        block, stop = update.loss_start, update.stop
        errors = self._steps.slice(block, stop)

        def run(a: int, b: int, state: st.State) -> tuple[torch.Tensor, st.State]:
            with self.autocast():
                return call_model(self.model, self._steps.slice(a, b).inputs, self._enter(a, state))

        def block_loss(outputs: torch.Tensor) -> torch.Tensor:
            losses = step_losses(self.loss_fn, outputs[:, block - start :], errors.targets, errors.mask)
            return masked_sum(losses, errors.mask)[0]

        curve = measured_curve(run, block_loss, lambda positions: self._cuts(start, stop, *positions), start, block,
                               plan.schedule.stride, self._states[start], self._batch_size or 1, self.combine)
        plan.observe(curve, update)
        self.measure_steps += stop - start
        self.measure_seconds += time.process_time() - started

    def _run_segment(
        self, a: int, b: int, prior: st.State, weights: "WeightSnapshot | dict[str, torch.Tensor]",
        replay: Optional[dict] = None,
    ) -> Segment:
        """Run steps [a, b) once, keeping the graph for later windows: with the model's own weights,
        saved for the backward as the block's ``WeightSnapshot`` holds them; or, to rebuild a saved
        segment, under ``weights`` given as tensors, in ``replay``'s random state and mode."""
        piece = self._steps.slice(a, b)
        in_state = st.detach_requiring_grad(prior)
        snapshot = weights if isinstance(weights, WeightSnapshot) else None
        devices = [piece.inputs.device] if piece.inputs.is_cuda else []
        with torch.random.fork_rng(devices=devices, enabled=replay is not None), \
                (snapshot.hooks() if snapshot is not None else nullcontext()):
            if replay is not None:
                torch.set_rng_state(replay["cpu"])
                if devices:
                    torch.cuda.set_rng_state(replay["cuda"], devices[0])
            random = replay or {"cpu": torch.get_rng_state(), "training": self.model.training,
                                **({"cuda": torch.cuda.get_rng_state(devices[0])} if devices else {})}
            training = self.model.training
            self.model.train(random["training"])
            try:
                call_weights = None if snapshot is not None else {**weights, **dict(self.model.named_buffers())}
                out, out_state = self._call(piece.inputs, self._enter(a, in_state), call_weights)
            finally:
                self.model.train(training)
            losses = step_losses(self.loss_fn, out, piece.targets, piece.mask)
        if snapshot is not None:
            return Segment(a, b, in_state, out_state, losses, piece.mask, snapshot.values, random, snapshot.params)
        return Segment(a, b, in_state, out_state, losses, piece.mask, weights, random, weights)

    def _stored_block(self, update: Update) -> UpdateResult:
        previous, stop = self.previous, update.stop
        named = self.named_parameters()
        trainable = {id(p) for _, p in named}
        weights = WeightSnapshot(named, [p for p in self.model.parameters() if id(p) not in trainable]
                                 + list(self.model.buffers()))
        cuts = self._cuts(previous, stop, *self.plan.starts_in(previous, stop))
        prior: st.State = self._segments[-1].out_state if self._segments else self._states[previous]
        for a, b in zip(cuts[:-1], cuts[1:]):
            segment = self._run_segment(a, b, prior, weights)
            self._segments.append(segment)
            self._states[b] = st.detach(segment.out_state)
            prior = segment.out_state

        window = [s for s in self._segments if s.start >= update.start]
        if not window or window[0].start != update.start:
            raise RuntimeError(f"internal: no stored segment starts at window start {update.start}")
        if not any(s.step_losses.requires_grad for s in window):
            require_gradient(window[-1].step_losses, None, len(named))
        loss, count, grads = window_gradient(window, update.loss_start, [n for n, _ in named])
        return UpdateResult(update, loss.detach(), grads, count, params=named)
