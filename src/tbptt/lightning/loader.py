"""``segments``: B streams as consecutive time segments, a stateful loader for Lightning.

A pass over the loader is one epoch: the segments of the streams in order, never shuffled, the last
one marked ``end_of_stream``. Under data parallelism (``torch.distributed`` initialised, as
Lightning's ``strategy="ddp"`` does) each rank gets its contiguous share of the rows, every step of
them: the ranks cut the streams, not the time axis. The loader's ``state_dict`` is the segment the
pass goes on with, which Lightning saves in its checkpoints and gives back on resume.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional

import torch
import torch.distributed as dist

from ..data.streams import Split, as_split
from ..validate import positive_int


class SegmentBatch(NamedTuple):
    """Steps ``[start, start + T)`` of the B streams (this rank's rows under data parallelism):
    ``inputs[B, T, ...]``, ``targets[B, T, ...]``, ``mask``/``resets`` ``[B, T]`` bool or None, and
    whether the streams end with this segment (the last of a pass)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: Optional[torch.Tensor]
    resets: Optional[torch.Tensor]
    start: Optional[int]
    end_of_stream: bool


class SegmentLoader:
    """The segments of a split, in order, one pass per epoch (see ``segments``)."""

    def __init__(self, split: Split, segment_length: Optional[int]) -> None:
        self.split = split
        self.segment_length = segment_length
        steps = split.steps
        length = steps if segment_length is None else segment_length
        self._bounds = [(a, min(a + length, steps)) for a in range(0, steps, length)]
        self._next = 0  # the segment the pass goes on with
        self._resume = 0  # where the next pass starts: 0, or the segment a checkpoint saved

    def __len__(self) -> int:
        return len(self._bounds)

    def __iter__(self) -> Iterator[SegmentBatch]:
        first, self._resume = self._resume, 0
        split = self._rows()
        last = len(self._bounds) - 1
        for i in range(first, last + 1):
            a, b = self._bounds[i]
            self._next = 0 if i == last else i + 1
            pick = lambda t: None if t is None else t[:, a:b]  # noqa: E731
            yield SegmentBatch(pick(split.inputs), pick(split.targets), pick(split.mask), pick(split.resets),
                               a, i == last)

    def state_dict(self) -> dict[str, Any]:
        """Where the pass stands (the next segment) and the shape of the data it was cut from."""
        return {"next": self._next, **self._layout()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Go on, at the next pass, with the segment ``state_dict`` saved; the data must be cut the same way."""
        if {k: saved.get(k) for k in self._layout()} != self._layout():
            raise ValueError(
                f"the checkpoint's loader cut {saved.get('rows')} streams of {saved.get('steps')} steps into "
                f"segments of {saved.get('segment_length')}; this loader cuts {self.split.batch_size} streams of "
                f"{self.split.steps} steps into segments of {self.segment_length}: resume on the same data cut "
                "the same way"
            )
        self._resume = self._next = saved["next"]

    def _layout(self) -> dict[str, Any]:
        return {"rows": self.split.batch_size, "steps": self.split.steps, "segment_length": self.segment_length}

    def _rows(self) -> Split:
        """This process's rows: all of them, or under data parallelism its contiguous share."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.split
        rank, world = dist.get_rank(), dist.get_world_size()
        if self.split.batch_size % world:
            raise ValueError(
                f"segments(...) holds B={self.split.batch_size} streams, which {world} processes cannot share "
                f"evenly (each rank carries whole streams); use a number of streams that is a multiple of {world}"
            )
        return self.split.rows(rank, world)


def segments(
    inputs: Any,
    targets: Optional[torch.Tensor] = None,
    segment_length: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
    resets: Optional[torch.Tensor] = None,
) -> SegmentLoader:
    """A Lightning loader of consecutive segments of B streams, ``segment_length`` steps each (the
    last may be shorter; None: the whole streams in one segment), in order, never shuffled.

    ``inputs[B, T, ...]`` and ``targets`` with optional ``mask``/``resets`` ``[B, T]`` bool, as
    ``Trainer.train_on`` takes them, or a ``tbptt.data.Split`` (a task's ``train``, the output of
    ``stateful_streams``, ``padded_batch``, ``packed_streams``) or a tuple ``(inputs, targets[,
    mask[, resets]])`` in place of ``inputs``. A pass is one epoch and its last segment ends the
    streams. Under data parallelism each rank takes its share of the rows (B must divide evenly).
    The loader is stateful: a checkpoint taken inside an epoch resumes at the next segment.

    Example::

        loader = segments(torch.randn(8, 1000, 3), torch.randn(8, 1000, 2), segment_length=100)
        len(loader)  # 10 segments of [8, 100, ...]
    """
    if targets is None:
        if isinstance(inputs, torch.Tensor):
            raise TypeError("segments(inputs, targets, segment_length) needs the targets [B, T, ...] beside the "
                            "inputs; got only inputs (or pass one tbptt.data.Split)")
        if mask is not None or resets is not None:
            raise ValueError("segments(split, ...) takes the mask and resets from the split; pass inputs and "
                             "targets as tensors to give them separately")
        split = as_split(inputs, "inputs")
    else:
        split = Split(inputs, targets, mask, resets)
    length = positive_int(segment_length, "segment_length", "steps per segment", none="the whole streams at once")
    return SegmentLoader(split, length)
