"""Arranging data into B parallel streams for ``Trainer.train_on``.

A ``Split`` is the unit every task hands out: ``inputs[B, T, ...]`` and ``targets[B, T, ...]`` with
an optional ``mask[B, T]`` (True = a valid step) and an optional ``resets[B, T]`` (True = a new
sequence starts at this step in this row). ``mask=None`` means every step is valid and
``resets=None`` means each row is one stream from its first step to its last.

Three arrangements cover the usual cases:

- ``stateful_streams``: one long series cut into B contiguous pieces, row i followed by row i+1
  (what Keras' ``stateful=True`` asks the user to arrange by hand);
- ``padded_batch``: independent sequences of different lengths, one per row, padded at the end;
- ``packed_streams``: many documents or episodes streamed back to back through B rows, with a
  reset at the first step of each.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..validate import positive_int

ArrayLike = Union[Tensor, np.ndarray]


# eq=False: tensors compare elementwise, so splits compare by identity
@dataclass(frozen=True, eq=False)
class Split:
    """B streams of T steps: ``inputs[B, T, ...]``, ``targets[B, T, ...]``, ``mask[B, T]`` bool
    (None: all steps valid) and ``resets[B, T]`` bool (None: no sequence boundary inside a row)."""

    inputs: Tensor
    targets: Tensor
    mask: Optional[Tensor] = None
    resets: Optional[Tensor] = None

    def __post_init__(self) -> None:
        for name in ("inputs", "targets"):
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise TypeError(f"Split.{name} must be a torch.Tensor [B, T, ...]; got {type(value).__name__}")
            if value.dim() < 2 or value.shape[0] < 1 or value.shape[1] < 1:
                raise ValueError(
                    f"Split.{name} must be [B, T, ...] with B >= 1 and T >= 1; got shape {tuple(value.shape)}"
                )
        if self.targets.shape[:2] != self.inputs.shape[:2]:
            raise ValueError(
                f"Split.targets [B, T] = {tuple(self.targets.shape[:2])} does not match Split.inputs "
                f"[B, T] = {tuple(self.inputs.shape[:2])}; both must hold the same streams and steps"
            )
        for name in ("mask", "resets"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, Tensor) or value.dtype != torch.bool:
                kind = f"{value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
                raise TypeError(f"Split.{name} must be a bool tensor [B, T] or None; got a {kind}")
            if value.shape != self.inputs.shape[:2]:
                raise ValueError(
                    f"Split.{name} must be [B, T] = {tuple(self.inputs.shape[:2])}; got shape {tuple(value.shape)}"
                )

    @property
    def batch_size(self) -> int:
        """B, the number of rows (streams)."""
        return self.inputs.shape[0]

    @property
    def steps(self) -> int:
        """T, the number of steps in every row."""
        return self.inputs.shape[1]

    @property
    def valid_steps(self) -> int:
        """How many (row, step) pairs are valid."""
        return int(self.mask.sum()) if self.mask is not None else self.batch_size * self.steps

    def segments(self, length: int) -> Iterator["Split"]:
        """The split cut along time into consecutive pieces of ``length`` steps (the last may be
        shorter), in order: feed them one after another to ``Trainer.train_on``."""
        positive_int(length, "length", "steps per segment")
        for start in range(0, self.steps, length):
            yield self._select(slice(None), slice(start, start + length))

    def rows(self, rank: int, world: int) -> "Split":
        """The contiguous share of rows that rank ``rank`` of ``world`` data-parallel workers trains on."""
        positive_int(world, "world", "data-parallel workers")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"rank must be an int in [0, {world}) for world={world}; got {rank!r}")
        if self.batch_size % world:
            raise ValueError(
                f"cannot share B={self.batch_size} rows evenly among world={world} workers; "
                f"choose a batch size that is a multiple of {world}"
            )
        share = self.batch_size // world
        return self._select(slice(rank * share, (rank + 1) * share), slice(None))

    def to(self, device: Union[str, torch.device]) -> "Split":
        """The same split with every tensor on ``device``."""
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return Split(move(self.inputs), move(self.targets), move(self.mask), move(self.resets))

    def checksums(self) -> Tensor:
        """Per row, a checksum of its values in every tensor of the split: ``[B, 8]`` int64, the
        wrapping sums of the elements' bit patterns, plain and weighted by position. Integer sums
        are exact, so a row's checksum is the same whichever rows it is computed with (a rank's
        share or all of them); any change of a value changes it but for a vanishing chance."""
        parts = [_row_checksums(t, self.batch_size) for t in (self.inputs, self.targets, self.mask, self.resets)]
        return torch.cat(parts, dim=1)

    def fingerprint(self, checksums: Optional[Tensor] = None) -> dict:
        """What identifies the data: each tensor's shape (with B the rows of ``checksums``) and
        dtype, and a digest of the rows' ``checksums()`` (those of all rows, when this split is one
        share of them: data-parallel training gathers them). Plain data, for a checkpoint."""
        rows = self.checksums() if checksums is None else checksums
        shapes = {name: None if t is None else [int(rows.shape[0]), *t.shape[1:]]
                  for name, t in (("inputs", self.inputs), ("targets", self.targets), ("mask", self.mask),
                                  ("resets", self.resets))}
        dtypes = {name: str(t.dtype) for name, t in (("inputs", self.inputs), ("targets", self.targets))}
        digest = hashlib.sha256(rows.contiguous().numpy().tobytes()).hexdigest()
        return {"shapes": shapes, "dtypes": dtypes, "checksum": digest}

    def _select(self, rows: slice, steps: slice) -> "Split":
        pick = lambda x: None if x is None else x[rows, steps]  # noqa: E731
        return Split(pick(self.inputs), pick(self.targets), pick(self.mask), pick(self.resets))


def as_split(data: object, name: str = "data") -> Split:
    """``data`` as a ``Split``: a Split, any object with ``inputs`` and ``targets`` (and optionally
    ``mask`` and ``resets``), or a tuple ``(inputs, targets[, mask[, resets]])``."""
    if isinstance(data, Split):
        return data
    if isinstance(data, (tuple, list)):
        if not 2 <= len(data) <= 4:
            raise ValueError(f"{name} as a tuple must be (inputs, targets[, mask[, resets]]); got {len(data)} items")
        return Split(*data)
    if hasattr(data, "inputs") and hasattr(data, "targets"):
        return Split(data.inputs, data.targets, getattr(data, "mask", None), getattr(data, "resets", None))
    raise TypeError(
        f"{name} must have .inputs and .targets (a tbptt.data.Split) or be a tuple "
        f"(inputs, targets[, mask[, resets]]); got {type(data).__name__}"
    )


def stateful_streams(
    inputs: ArrayLike, targets: ArrayLike, batch_size: int, mask: Optional[ArrayLike] = None
) -> Split:
    """One long aligned series (``inputs[T, ...]``, ``targets[T, ...]``) as B contiguous streams.

    Row i holds a contiguous piece of the series and row i + 1 the piece right after it, so
    concatenating the rows' valid steps in row order gives back the series. Nothing is dropped:
    when T is not a multiple of B the first ``T % B`` rows are one step longer, and the others
    end with one padding step (zeros, mask False). ``mask[T]`` bool marks steps of the series
    that are not to be scored (e.g. missing values); the mask is None when every step is valid.
    Trailing dimensions are kept: ``[T]`` gives ``[B, T / B]`` (e.g. tokens), ``[T, F]`` gives
    ``[B, T / B, F]``.
    """
    x = _as_tensor("inputs", inputs)
    y = _as_tensor("targets", targets)
    positive_int(batch_size, "batch_size", "rows")
    if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"inputs and targets must be aligned series [T, ...] of the same length; got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    n = x.shape[0]
    m = None
    if mask is not None:
        m = _as_tensor("mask", mask)
        if m.dtype != torch.bool or tuple(m.shape) != (n,):
            raise ValueError(f"mask must be a bool [{n}] tensor aligned with the series; got {m.dtype} {tuple(m.shape)}")
    if n < batch_size:
        raise ValueError(
            f"a series of {n} steps cannot fill batch_size={batch_size} streams; use batch_size <= {n}"
        )
    quotient, remainder = divmod(n, batch_size)
    lengths = [quotient + (row < remainder) for row in range(batch_size)]
    bounds = np.cumsum([0] + lengths)
    docs = [(x[a:b], y[a:b], None if m is None else m[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    placement = [(row, 0) for row in range(batch_size)]
    return _assemble(docs, placement, batch_size, with_resets=False)


def padded_batch(
    sequences_inputs: Sequence[ArrayLike],
    sequences_targets: Sequence[ArrayLike],
    masks: Optional[Sequence[ArrayLike]] = None,
) -> Split:
    """Independent sequences (``inputs[T_i, ...]``, ``targets[T_i, ...]``) as one row each,
    right-padded with zeros to the longest; the mask is False on the padding (and wherever a
    sequence's own ``masks[i][T_i]`` is False). The mask is None when every step is valid."""
    docs = _documents(sequences_inputs, sequences_targets, masks)
    placement = [(i, 0) for i in range(len(docs))]
    return _assemble(docs, placement, len(docs), with_resets=False)


def packed_streams(
    sequences_inputs: Sequence[ArrayLike],
    sequences_targets: Sequence[ArrayLike],
    batch_size: int,
    masks: Optional[Sequence[ArrayLike]] = None,
) -> Split:
    """Many documents or episodes streamed back to back through ``batch_size`` rows.

    Documents are placed in order, each on the row that is shortest so far (the lowest row on a
    tie), so the rows end up about equally long. ``resets`` is True at the first step of every
    document: its row's state is zeroed there and no gradient crosses the boundary. Rows are
    right-padded with zeros to the longest; the mask is False on the padding (and wherever a
    document's own ``masks[i]`` is False), None when every step is valid. A row that receives no
    document is all padding.
    """
    positive_int(batch_size, "batch_size", "rows")
    docs = _documents(sequences_inputs, sequences_targets, masks)
    lengths = [0] * batch_size
    placement = []
    for doc in docs:
        row = min(range(batch_size), key=lambda r: (lengths[r], r))
        placement.append((row, lengths[row]))
        lengths[row] += doc[0].shape[0]
    return _assemble(docs, placement, batch_size, with_resets=True)


def forecasting_pairs(series: ArrayLike, horizon: int = 1) -> tuple[Tensor, Tensor]:
    """Inputs ``x[t]`` and targets ``x[t + horizon]`` from a series ``x[T]`` or ``x[T, F]``:
    two aligned series of ``T - horizon`` steps, shaped as the series."""
    x = _as_tensor("series", series)
    positive_int(horizon, "horizon", "steps ahead")
    if x.dim() not in (1, 2):
        raise ValueError(f"series must be [T] or [T, F]; got shape {tuple(x.shape)}")
    if x.shape[0] <= horizon:
        raise ValueError(
            f"a series of {x.shape[0]} steps has no pair {horizon} steps apart; use horizon < {x.shape[0]}"
        )
    return x[:-horizon], x[horizon:]


_Document = tuple[Tensor, Tensor, Optional[Tensor]]


def _assemble(docs: list[_Document], placement: list[tuple[int, int]], rows: int, with_resets: bool) -> Split:
    """Writes each document at its (row, offset); the rest is zero padding with mask False."""
    steps = max(offset + doc[0].shape[0] for doc, (_, offset) in zip(docs, placement))
    first_x, first_y, _ = docs[0]
    inputs = first_x.new_zeros((rows, steps) + tuple(first_x.shape[1:]))
    targets = first_y.new_zeros((rows, steps) + tuple(first_y.shape[1:]))
    mask = torch.zeros(rows, steps, dtype=torch.bool)
    resets = torch.zeros(rows, steps, dtype=torch.bool)
    for (x, y, m), (row, offset) in zip(docs, placement):
        stop = offset + x.shape[0]
        inputs[row, offset:stop] = x
        targets[row, offset:stop] = y
        mask[row, offset:stop] = True if m is None else m
        resets[row, offset] = True
    return Split(inputs, targets, None if bool(mask.all()) else mask, resets if with_resets else None)


def _documents(
    sequences_inputs: Sequence[ArrayLike],
    sequences_targets: Sequence[ArrayLike],
    masks: Optional[Sequence[ArrayLike]],
) -> list[_Document]:
    """Validated (inputs, targets, mask) per sequence: same lengths within a sequence, same
    trailing shape and dtype across sequences."""
    for name, seqs in (("sequences_inputs", sequences_inputs), ("sequences_targets", sequences_targets)):
        if isinstance(seqs, (Tensor, np.ndarray)) or not isinstance(seqs, Sequence):
            raise TypeError(f"{name} must be a list of [T_i, ...] tensors; got {type(seqs).__name__}")
    if len(sequences_inputs) != len(sequences_targets) or not sequences_inputs:
        raise ValueError(
            f"need one targets sequence per inputs sequence, at least one; got {len(sequences_inputs)} "
            f"inputs and {len(sequences_targets)} targets"
        )
    if masks is not None and len(masks) != len(sequences_inputs):
        raise ValueError(f"need one mask per sequence; got {len(masks)} masks for {len(sequences_inputs)} sequences")
    docs = []
    for i, (xi, yi) in enumerate(zip(sequences_inputs, sequences_targets)):
        x = _as_tensor(f"sequences_inputs[{i}]", xi)
        y = _as_tensor(f"sequences_targets[{i}]", yi)
        if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(
                f"sequence {i}: inputs and targets must be non-empty [T_i, ...] of the same length; got "
                f"shapes {tuple(x.shape)} and {tuple(y.shape)}"
            )
        m = None
        if masks is not None:
            m = _as_tensor(f"masks[{i}]", masks[i])
            if m.dtype != torch.bool or tuple(m.shape) != (x.shape[0],):
                raise ValueError(f"masks[{i}] must be a bool [{x.shape[0]}] tensor; got {m.dtype} {tuple(m.shape)}")
        first_x, first_y = (x, y) if not docs else docs[0][:2]
        for name, a, b in (("inputs", x, first_x), ("targets", y, first_y)):
            if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                raise ValueError(
                    f"sequence {i}: {name} are {a.dtype} [T, {', '.join(map(str, a.shape[1:]))}] but sequence 0's "
                    f"are {b.dtype} [T, {', '.join(map(str, b.shape[1:]))}]; all sequences need the same "
                    "trailing shape and dtype"
                )
        docs.append((x, y, m))
    return docs


def _as_tensor(name: str, value: ArrayLike) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        # a copy: the caller's array (possibly read-only, e.g. from pandas) is never shared
        return torch.tensor(value)
    raise TypeError(f"{name} must be a torch.Tensor or numpy array; got {type(value).__name__}")


_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_ROWS_AT_ONCE = 1 << 22  # elements turned into int64 at a time: bounded extra memory for any split


def _row_checksums(t: Optional[Tensor], rows: int) -> Tensor:
    """``[rows, 2]`` int64: per row, the wrapping sum of the bit patterns of ``t``'s elements and
    that sum weighted by position (zeros for a missing tensor)."""
    if t is None:
        return torch.zeros(rows, 2, dtype=torch.int64)
    if t.is_complex():
        t = torch.view_as_real(t)
    flat = t.detach().reshape(rows, -1).contiguous()
    bits = flat.view(_INTS[flat.element_size()]) if flat.numel() else flat.to(torch.uint8)
    weights = torch.arange(flat.shape[1], device=flat.device) % 65521 + 1
    step = max(1, _ROWS_AT_ONCE // max(1, flat.shape[1]))
    out = []
    for a in range(0, rows, step):
        x = bits[a:a + step].to(torch.int64)
        out.append(torch.stack([x.sum(dim=1), (x * weights).sum(dim=1)], dim=1))
    return torch.cat(out).cpu()
