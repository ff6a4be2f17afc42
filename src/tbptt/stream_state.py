"""The streams as they stand, as data: what ``StreamEngine.state_dict`` saves and loads.

A ``StreamState`` holds the stream position, the carried states the open block and later windows
need, the open block's buffered steps, and, for the ``stored`` strategy, what rebuilds the kept
activations (weight snapshots and, per segment, its steps, entering state and random state), and
the schedule's plan: ARTBP's window starts drawn so far and its generator's state, AdaptiveTBPTT's
choices of k2 and measurements (the same on every rank of a data-parallel job). Every
row-indexed tensor in it can be sliced by rows (``take_rows``) and the rows of several shares put
together (``cat_rows``): data-parallel training saves one state of all rows from the ranks' shares
and hands each rank its rows back on resume. On disk it is plain data (``to_dict``), so that safe
loading (``torch.load(weights_only=True)``) reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import state as st
from .contract import call_model
from .saved import CheckpointError, Fields, bad, integer, nesting, tensor, tensor_dict
from .steps import StepBuffer, Steps, reset_positions


@dataclass
class SegmentEntry:
    """A stored segment to rebuild: steps ``[start, stop)`` run from ``in_state`` under weight
    snapshot number ``weights``, with the random generators' states and mode in ``random``."""

    start: int
    stop: int
    in_state: st.State
    weights: int
    random: dict


@dataclass
class StreamState:
    """The engine's streams (see the module's docstring)."""

    schedule: str
    strategy: str
    position: int = 0
    previous: int = 0
    states: dict[int, st.State] = field(default_factory=dict)
    chunks: list[Steps] = field(default_factory=list)
    reset_positions: list[int] = field(default_factory=list)
    batch_size: Optional[int] = None
    state_shapes: Optional[list[tuple[int, ...]]] = None
    forward_steps: int = 0
    backward_steps: int = 0
    snapshots: list[dict[str, torch.Tensor]] = field(default_factory=list)
    segments: list[SegmentEntry] = field(default_factory=list)
    ending: bool = False  # the streams end after the steps received (their last updates not made yet)
    plan: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data: dicts, lists, tuples, numbers, strings and tensors."""
        return {
            "schedule": self.schedule,
            "strategy": self.strategy,
            "position": self.position,
            "previous": self.previous,
            "states": dict(self.states),
            "chunks": [(c.start, c.inputs, c.targets, c.mask, c.resets) for c in self.chunks],
            "reset_positions": list(self.reset_positions),
            "batch_size": self.batch_size,
            "state_shapes": self.state_shapes,
            "forward_steps": self.forward_steps,
            "backward_steps": self.backward_steps,
            "snapshots": self.snapshots,
            "segments": [{"start": s.start, "stop": s.stop, "in_state": s.in_state, "weights": s.weights,
                          "random": s.random} for s in self.segments],
            "ending": self.ending,
            "plan": dict(self.plan),
        }

    @classmethod
    def from_dict(cls, saved: Any, where: str = "engine") -> "StreamState":
        """The state ``to_dict`` wrote, every field checked: a missing, mistyped or impossible one (a
        negative position, ``previous`` past ``position``, steps that do not join up) is a
        ``CheckpointError`` naming it (``where`` is the dict's path in the checkpoint)."""
        f = Fields(saved, where)
        position = f.int("position")
        previous = f.int("previous", high=position)
        batch_size = f.int("batch_size", low=1, none=True)
        snapshots = [tensor_dict(s, f"{f.path('snapshots')}[{i}]") for i, s in enumerate(f.list("snapshots"))]
        chunks = _read_chunks(f, position, previous, batch_size)
        shapes = f.raw("state_shapes")
        if shapes is not None and not (isinstance(shapes, (list, tuple)) and all(
                isinstance(s, (list, tuple)) and all(integer(n, f.path("state_shapes")) is not None for n in s)
                for s in shapes)):
            raise bad(f.path("state_shapes"), "None or a list of shapes (lists of ints)", shapes)
        streams = cls(
            schedule=f.str("schedule"),
            strategy=f.str("strategy", ("recompute", "stored")),
            position=position,
            previous=previous,
            states=_read_states(f, position, previous),
            chunks=chunks,
            reset_positions=[integer(p, f"{f.path('reset_positions')}[{i}]", high=position)
                             for i, p in enumerate(f.list("reset_positions"))],
            batch_size=batch_size,
            state_shapes=None if shapes is None else [tuple(s) for s in shapes],
            forward_steps=f.int("forward_steps"),
            backward_steps=f.int("backward_steps"),
            snapshots=snapshots,
            segments=_read_segments(f, len(snapshots), previous, chunks),
            # checkpoints written before streams could end with updates pending were never ending
            ending=f.bool("ending") if "ending" in saved else False,
            plan=_read_plan(f),
        )
        return streams

    def check_resumable(self, first: int, overlapping: bool, parameters: dict[str, tuple[int, ...]]) -> None:
        """Raise a ``CheckpointError`` unless these streams hold what the next updates need from step
        ``first`` on (the schedule's plan says where their windows start): the entering state and
        steps there (or, when activations are kept across updates, a kept segment starting there),
        states of the saved shapes, and weight snapshots of the ``parameters`` (names and shapes) of
        the model."""
        previous = self.previous
        if overlapping:
            if first < previous and first not in {seg.start for seg in self.segments}:
                raise CheckpointError(f"checkpoint field engine.segments has no segment starting at step {first}, "
                                      "where the next window starts")
        elif first not in self.states:
            raise CheckpointError(f"checkpoint field engine.states lacks the state at step {first}, where the next "
                                  "window starts")
        if first < previous and (not self.chunks or self.chunks[0].start > first):
            raise CheckpointError(f"checkpoint field engine.chunks must hold the steps from {first} on, which the "
                                  "next window runs through")
        if self.state_shapes is not None:
            for where, state in [*((f"states[{k}]", v) for k, v in self.states.items()),
                                 *((f"segments[{i}].in_state", s.in_state) for i, s in enumerate(self.segments))]:
                if state is not None and st.shapes(state) != self.state_shapes:
                    raise CheckpointError(f"checkpoint field engine.{where} has shapes {st.shapes(state)}; the "
                                          f"model's state has {self.state_shapes}")
        for i, snap in enumerate(self.snapshots):
            if {n: tuple(w.shape) for n, w in snap.items()} != parameters:
                raise CheckpointError(f"checkpoint field engine.snapshots[{i}] does not hold the model's trainable "
                                      "parameters with their shapes")

    # ------------------------------------------------------------------------------------------
    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "StreamState":
        """The same state with ``fn`` applied to every tensor (moving to a device, copying) but the
        random generators' states, which stay on the CPU as torch keeps them."""
        tree = pytree.tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x,
                               (self.states, [_steps_tuple(c) for c in self.chunks], self.snapshots,
                                [s.in_state for s in self.segments]))
        states, chunks, snapshots, in_states = tree
        segments = [replace(s, in_state=i) for s, i in zip(self.segments, in_states)]
        return replace(self, states=states, chunks=[Steps(*c) for c in chunks], snapshots=snapshots,
                       segments=segments)

    def to(self, device: Any) -> "StreamState":
        return self.map_tensors(lambda x: x.to(device))

    def take_rows(self, a: int, b: int) -> "StreamState":
        """The streams of rows ``[a, b)`` alone."""
        rows = self.batch_size
        if rows is None:
            return self
        chunks = [Steps(c.start, *(None if t is None else t[a:b] for t in _steps_tuple(c)[1:])) for c in self.chunks]
        return replace(
            self,
            batch_size=b - a,
            states={k: _take_rows(v, rows, a, b) for k, v in self.states.items()},
            chunks=chunks,
            reset_positions=sorted({p for c in chunks for p in reset_positions(c.resets, c.start)}),
            state_shapes=None if self.state_shapes is None else [_resized(s, rows, b - a) for s in self.state_shapes],
            segments=[replace(s, in_state=_take_rows(s.in_state, rows, a, b)) for s in self.segments],
        )

    @classmethod
    def cat_rows(cls, shares: list["StreamState"]) -> "StreamState":
        """One state of all rows from states of consecutive rows (in row order) of the same streams,
        whose stored segments are cut at the same positions (``recut`` makes them so)."""
        first = shares[0]
        for key in ("schedule", "strategy", "position", "previous", "ending"):
            if any(getattr(s, key) != getattr(first, key) for s in shares):
                raise ValueError(f"the ranks' streams differ in {key}: {[getattr(s, key) for s in shares]}")
        if first.batch_size is None or len(shares) == 1:
            return first
        rows = first.batch_size
        if any(s.batch_size != rows for s in shares):
            raise ValueError(f"ranks hold different numbers of rows {[s.batch_size for s in shares]}; use Split.rows")
        cuts = [[(seg.start, seg.stop) for seg in s.segments] for s in shares]
        if any(c != cuts[0] for c in cuts):
            raise ValueError(f"the ranks' stored segments do not line up: {cuts}")
        keys = [k for k in first.states if all(k in s.states for s in shares)]
        total = rows * len(shares)
        return replace(
            first,
            batch_size=total,
            states={k: _cat_rows([s.states[k] for s in shares], rows) for k in keys},
            chunks=[_cat_steps(parts) for parts in zip(*(s.chunks for s in shares))],
            reset_positions=sorted(set().union(*(s.reset_positions for s in shares))),
            state_shapes=None if first.state_shapes is None else [_resized(s, rows, total) for s in first.state_shapes],
            segments=[replace(seg, in_state=_cat_rows([s.segments[i].in_state for s in shares], rows))
                      for i, seg in enumerate(first.segments)],
        )

    def recut(self, positions: list[int], model: nn.Module, reset_fn: Callable) -> "StreamState":
        """The same streams with the stored segments also cut at ``positions`` (where other ranks'
        rows reset): the state at a new cut is run forward from the segment's start under its weight
        snapshot."""
        steps = StepBuffer()
        for chunk in self.chunks:
            steps.append(chunk)
        device = next(model.parameters()).device
        out = []
        for seg in self.segments:
            bounds = [seg.start, *[p for p in positions if seg.start < p < seg.stop], seg.stop]
            state = seg.in_state
            weights = {n: w.to(device) for n, w in {**self.snapshots[seg.weights], **dict(model.named_buffers())}.items()}
            for a, b in zip(bounds[:-1], bounds[1:]):
                out.append(replace(seg, start=a, stop=b, in_state=state))
                if b == seg.stop:
                    break
                entering = st.map_tensors(lambda x: x.to(device), state)
                rows = steps.rows_reset_at(a)
                if rows is not None and entering is not None:
                    entering = reset_fn(entering, rows.to(device))
                with torch.no_grad():
                    _, state = call_model(model, steps.slice(a, b).inputs.to(device), entering, weights)
                state = st.map_tensors(lambda x: x.detach().to("cpu", copy=True), state)
        return replace(self, segments=out)


def merge_rows(shares: list[StreamState], model: nn.Module, reset_fn: Callable = st.reset_rows) -> StreamState:
    """One state of all rows from the ranks' shares (rank order = row order), the state one process
    would hold; stored segments that only some ranks cut (at their own resets) are cut alike first."""
    positions = sorted(set().union(*(s.reset_positions for s in shares)))
    if len(shares) > 1 and any(s.segments for s in shares):
        shares = [s.recut(positions, model, reset_fn) for s in shares]
    return StreamState.cat_rows(shares)


# ----------------------------------------------------------------------------------------------
def _steps_tuple(c: Steps) -> tuple:
    return (c.start, c.inputs, c.targets, c.mask, c.resets)


def _cat_steps(parts: tuple[Steps, ...]) -> Steps:
    def flags(field_name: str, fill: bool) -> Optional[torch.Tensor]:
        values = [getattr(p, field_name) for p in parts]
        if all(v is None for v in values):
            return None
        return torch.cat([v if v is not None else torch.full(p.inputs.shape[:2], fill, dtype=torch.bool)
                          for v, p in zip(values, parts)])

    return Steps(parts[0].start, torch.cat([p.inputs for p in parts]), torch.cat([p.targets for p in parts]),
                 flags("mask", True), flags("resets", False))


def rows_dim(shape: tuple[int, ...], rows: int) -> int:
    """The dimension of a state tensor of ``shape`` that indexes ``rows`` streams (``state.batch_dim``),
    refusing shapes where it would be a guess."""
    if len(shape) >= 2 and shape[0] == rows and shape[1] == rows:
        raise ValueError(
            f"a state tensor of shape {shape} has {rows} in both its first dimensions, so which one indexes "
            f"the {rows} streams is ambiguous; resume with the world size that was saved, or choose a "
            "number of rows per rank that differs from the state's other sizes (e.g. the layers)"
        )
    try:
        return st.batch_dim(torch.empty(shape, device="meta"), rows)
    except ValueError:
        raise ValueError(
            f"a state tensor of shape {shape} has no dimension of size {rows} (the streams); states "
            "whose tensors are not indexed by the rows cannot be split among ranks"
        ) from None


def _cat_rows(states: list[st.State], rows: int) -> st.State:
    flat = [pytree.tree_flatten(s) for s in states]
    leaves = []
    for parts in zip(*(f[0] for f in flat)):
        if isinstance(parts[0], torch.Tensor):
            leaves.append(torch.cat(parts, dim=rows_dim(tuple(parts[0].shape), rows)))
        else:
            leaves.append(parts[0])
    return pytree.tree_unflatten(leaves, flat[0][1])


def _take_rows(state: st.State, rows: int, a: int, b: int) -> st.State:
    return st.map_tensors(lambda x: x.narrow(rows_dim(tuple(x.shape), rows), a, b - a), state)


def _resized(shape: tuple[int, ...], rows: int, new_rows: int) -> tuple[int, ...]:
    d = rows_dim(tuple(shape), rows)
    return tuple(new_rows if i == d else n for i, n in enumerate(shape))


# ----------------------------------------------------------------------------------------------
# reading a saved state back, field by field
def _read_states(f: Fields, position: int, previous: int) -> dict[int, st.State]:
    states = f.dict("states")
    for key, value in states.items():
        integer(key, f"{f.path('states')} key", high=position)
        nesting(value, f"{f.path('states')}[{key}]")
    if previous not in states:
        raise CheckpointError(f"checkpoint field {f.path('states')} lacks the state at step {previous}, where the "
                              "open block starts")
    return states


def _read_chunks(f: Fields, position: int, previous: int, batch_size: Optional[int]) -> list[Steps]:
    """The buffered steps: consecutive ``(start, inputs, targets, mask, resets)`` of the streams' rows,
    ending at ``position`` and holding the open block ``[previous, position)``."""
    chunks = []
    for i, raw in enumerate(f.list("chunks")):
        where = f"{f.path('chunks')}[{i}]"
        if not isinstance(raw, (list, tuple)) or len(raw) != 5:
            raise bad(where, "(start, inputs, targets, mask, resets)", raw)
        start = integer(raw[0], f"{where}.start", high=position)
        inputs, targets = tensor(raw[1], f"{where}.inputs"), tensor(raw[2], f"{where}.targets")
        mask, resets = (tensor(raw[3], f"{where}.mask", torch.bool, none=True),
                        tensor(raw[4], f"{where}.resets", torch.bool, none=True))
        if inputs.dim() < 2 or inputs.shape[1] == 0 or (batch_size is not None and inputs.shape[0] != batch_size):
            raise bad(f"{where}.inputs", f"[{batch_size or 'B'}, T >= 1, ...]", inputs)
        for name, t in (("targets", targets), ("mask", mask), ("resets", resets)):
            if t is not None and (t.dim() < 2 or tuple(t.shape[:2]) != tuple(inputs.shape[:2])):
                raise bad(f"{where}.{name}", f"a tensor of the inputs' [B, T] {tuple(inputs.shape[:2])}", t)
        if chunks and start != chunks[-1].stop:
            raise bad(f"{where}.start", f"{chunks[-1].stop}, where the steps before it end", start)
        chunks.append(Steps(start, inputs, targets, mask, resets))
    end = chunks[-1].stop if chunks else None
    if (chunks and end != position) or (position > previous and (not chunks or chunks[0].start > previous)):
        raise CheckpointError(f"checkpoint field {f.path('chunks')} must hold the steps of the open block "
                              f"[{previous}, {position}) and end at {position}; they cover "
                              f"{[chunks[0].start, end] if chunks else 'nothing'}")
    return chunks


def _read_plan(f: Fields) -> dict[str, Any]:
    """The schedule's plan (ARTBP's draws, AdaptiveTBPTT's choices): a dict whose generator state, if
    any, is a uint8 tensor; absent (``{}``) in checkpoints written before schedules had one. What the
    plan itself holds is checked when the schedule's plan loads it."""
    if "plan" not in f.saved:
        return {}
    plan = Fields(f.dict("plan"), f.path("plan"))
    if "generator" in plan.saved:
        plan.tensor("generator", torch.uint8)
    if "measure_steps" in plan.saved:
        plan.int("measure_steps")
    if "plan" in plan.saved:
        plan.dict("plan")
    return dict(plan.saved)


def _read_segments(f: Fields, snapshots: int, previous: int, chunks: list[Steps]) -> list[SegmentEntry]:
    segments = []
    first = chunks[0].start if chunks else previous
    for i, raw in enumerate(f.list("segments")):
        g = Fields(raw, f"{f.path('segments')}[{i}]")
        start = g.int("start", low=first if not segments else segments[-1].stop)
        stop = g.int("stop", low=start + 1, high=previous)
        random = g.dict("random")
        Fields(random, g.path("random")).tensor("cpu", torch.uint8)
        Fields(random, g.path("random")).bool("training")
        segments.append(SegmentEntry(start, stop, nesting(g.raw("in_state"), g.path("in_state")),
                                     g.int("weights", high=snapshots - 1), random))
    if segments and segments[-1].stop != previous:
        raise bad(f"{f.path('segments')}[-1].stop", f"{previous}, where the open block starts", segments[-1].stop)
    return segments
