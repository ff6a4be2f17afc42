"""What training did: one record per update, and a run's ``History`` (epochs, updates, how it ended).

The trainer writes records, the fit loop collects them into a history, experiments and reports
read them. Nothing here knows how an update is computed.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .files import PathLike, atomic_write_text
from .saved import CheckpointError, Fields, bad, integer


@dataclass(frozen=True)
class UpdateRecord:
    """What one update did: its window ``[start, stop)`` and errors ``[loss_start, stop)`` (stream
    positions; ``stop`` is where the update fell), its loss, the gradient norm (before clipping),
    wall time in seconds, whether it was skipped and why, and the window it was given: ``k2`` is
    TBPTT's k2 (None for n), ARTBP's L drawn (``k1 + J``, J clipped at the stream's start) or
    AdaptiveTBPTT's k2 in force."""

    start: int
    loss_start: int
    stop: int
    loss: float
    grad_norm: float
    wall_time: float
    skipped: bool = False
    reason: str = ""
    k2: Optional[int] = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient, raised when the trainer is told to stop on one.

    ``records`` holds the records of the updates the failing call applied before it.
    """

    def __init__(self, *args: object, records: Optional[list[UpdateRecord]] = None) -> None:
        super().__init__(*args)
        self.records: list[UpdateRecord] = list(records or [])


_BINS_PER_OCTAVE = 32  # gradient norms' histogram: a median within 2**(1/64) - 1 = 1.1% of the exact one


@dataclass
class UpdateStats:
    """A running summary of updates, of fixed size however many it has seen: how many were applied
    and skipped (and of those, for a non-finite value), the applied updates' summed loss, the wall
    time, and the gradient norms' largest value and a log-scale histogram of them (32 bins per
    doubling) that gives their median to within 1.1%."""

    updates: int = 0
    skipped: int = 0
    nonfinite: int = 0
    loss_sum: float = 0.0
    wall_time: float = 0.0
    norm_max: float = math.nan
    norm_bins: dict[int, int] = field(default_factory=dict)
    k2_sum: int = 0  # over the updates given a window of k2 steps (not n): their windows, summed
    k2_count: int = 0
    k2_last: Optional[int] = None

    def add(self, record: UpdateRecord) -> None:
        self.updates += 1
        self.wall_time += record.wall_time
        if record.k2 is not None:
            self.k2_sum, self.k2_count, self.k2_last = self.k2_sum + record.k2, self.k2_count + 1, record.k2
        if record.skipped:
            self.skipped += 1
            self.nonfinite += "non-finite" in record.reason
        else:
            self.loss_sum += record.loss
        norm = record.grad_norm
        if not math.isnan(norm):
            self.norm_max = norm if math.isnan(self.norm_max) else max(self.norm_max, norm)
        if math.isfinite(norm):
            # bin -2**31 holds zeros; bin i holds [2**(i/32), 2**((i+1)/32))
            key = math.floor(math.log2(norm) * _BINS_PER_OCTAVE) if norm > 0 else -(2**31)
            self.norm_bins[key] = self.norm_bins.get(key, 0) + 1

    @property
    def applied(self) -> int:
        return self.updates - self.skipped

    @property
    def k2_mean(self) -> Optional[float]:
        """The mean window the updates were given (``UpdateRecord.k2``); None if every one was n."""
        return self.k2_sum / self.k2_count if self.k2_count else None

    @property
    def train_loss(self) -> float:
        """The mean loss of the applied updates (NaN if none)."""
        return self.loss_sum / self.applied if self.applied else math.nan

    @property
    def grad_norm_median(self) -> float:
        """The median of the finite gradient norms, to within 1.1% (NaN if none)."""
        counts = sorted(self.norm_bins.items())
        total = sum(c for _, c in counts)
        if not total:
            return math.nan
        middle = [(total - 1) // 2, total // 2]  # 0-based ranks whose mean is the median
        values, seen = [], 0
        for key, count in counts:
            while middle and middle[0] < seen + count:
                values.append(0.0 if key == -(2**31) else 2 ** ((key + 0.5) / _BINS_PER_OCTAVE))
                middle.pop(0)
            seen += count
        return 0.5 * (values[0] + values[1])

    def state_dict(self) -> dict[str, Any]:
        return {**asdict(self), "norm_bins": dict(self.norm_bins)}

    @classmethod
    def from_dict(cls, saved: Any, where: str) -> "UpdateStats":
        """The summary ``state_dict`` wrote, every field checked (``CheckpointError`` naming it)."""
        f = Fields(saved, where)
        bins = f.dict("norm_bins")
        for key, count in bins.items():
            integer(key, f"{f.path('norm_bins')} key", low=None)
            integer(count, f"{f.path('norm_bins')}[{key}]", low=1)
        updates = f.int("updates")
        skipped = f.int("skipped", high=updates)
        norm_max = f.raw("norm_max")
        if isinstance(norm_max, bool) or not isinstance(norm_max, float):
            raise bad(f.path("norm_max"), "a float", norm_max)
        # the windows' summary is absent from checkpoints written before schedules varied it
        windows = (f.int("k2_sum"), f.int("k2_count", high=updates), f.int("k2_last", low=1, none=True)) \
            if "k2_count" in f.saved else (0, 0, None)
        return cls(updates, skipped, f.int("nonfinite", high=skipped), f.number("loss_sum"),
                   f.number("wall_time", low=0.0), norm_max, bins, *windows)


_NOT_KEPT = (
    "History.updates holds every update's record only when fit is asked for it (keep_updates=True); "
    "otherwise the history is bounded: History.totals and each epoch's row summarise the updates, and "
    "a callback's on_update(trainer, record) sees each record as it happens"
)


@dataclass
class History:
    """What ``fit`` did: one dict per epoch, a running summary of every update (``totals``) and of
    the open epoch's, how it ended, and every update's record only when asked (``records``: a list
    with ``fit(..., keep_updates=True)``, else None). Its size does not grow with the updates
    unless the records are kept."""

    epochs: list[dict] = field(default_factory=list)
    records: Optional[list[UpdateRecord]] = None
    stopped_early: bool = False
    diverged: bool = False
    stopped_by: str = ""
    best_epoch: Optional[int] = None
    totals: UpdateStats = field(default_factory=UpdateStats)
    epoch_stats: UpdateStats = field(default_factory=UpdateStats)

    @property
    def updates(self) -> list[UpdateRecord]:
        """Every update's record, kept with ``fit(..., keep_updates=True)`` (AttributeError otherwise)."""
        if self.records is None:
            raise AttributeError(_NOT_KEPT)
        return self.records

    def add(self, record: UpdateRecord) -> None:
        """Count an update in the run's and the epoch's summaries (and keep it, if records are kept)."""
        self.totals.add(record)
        self.epoch_stats.add(record)
        if self.records is not None:
            self.records.append(record)

    def close_epoch(self) -> None:
        """Start the next epoch's summary."""
        self.epoch_stats = UpdateStats()

    def k2(self) -> list[Optional[int]]:
        """The window each update was given, in order (``UpdateRecord.k2``): k2 over training, when
        the records are kept (each epoch's row has its mean, ``k2_mean``, and its last, ``k2_last``)."""
        return [r.k2 for r in self.updates]

    def write(self, path: PathLike) -> Path:
        """Write the epochs as JSON lines (``.jsonl``) or CSV (``.csv``), atomically."""
        path = Path(path)
        if path.suffix == ".jsonl":
            text = "".join(json.dumps(e) + "\n" for e in self.epochs)
        elif path.suffix == ".csv":
            buffer = io.StringIO()
            keys: list[str] = []
            for e in self.epochs:
                keys += [k for k in e if k not in keys]
            writer = csv.DictWriter(buffer, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.epochs)
            text = buffer.getvalue()
        else:
            raise ValueError(f"log must end in .jsonl or .csv; got {path}")
        return atomic_write_text(path, text)

    def state_dict(self) -> dict[str, Any]:
        """The history as plain data (for a checkpoint): of fixed size but for one row per epoch,
        unless the records are kept."""
        return {"epochs": list(self.epochs), "stopped_early": self.stopped_early, "diverged": self.diverged,
                "stopped_by": self.stopped_by, "best_epoch": self.best_epoch, "totals": self.totals.state_dict(),
                "epoch_stats": self.epoch_stats.state_dict(),
                "records": None if self.records is None else [r.as_dict() for r in self.records]}

    def load_state_dict(self, saved: Any, where: str = "history") -> None:
        """Replace this history by one saved with ``state_dict``, every field checked (a
        ``CheckpointError`` naming the field). Records are kept if this history keeps them, which
        needs a saved history that kept them too."""
        f = Fields(saved, where)
        epochs = f.list("epochs")
        for i, e in enumerate(epochs):
            if not isinstance(e, dict) or not isinstance(e.get("epoch"), int):
                raise bad(f"{f.path('epochs')}[{i}]", "an epoch's row (a dict with its 'epoch')", e)
        records = f.raw("records")
        if self.records is not None and records is None:
            raise CheckpointError(
                "this fit keeps every update's record (keep_updates=True) but the checkpoint was written "
                "without them; resume with keep_updates=False, or start afresh"
            )
        kept = None if self.records is None else [_record(r, f"{f.path('records')}[{i}]")
                                                 for i, r in enumerate(f.list("records"))]
        self.epochs, self.records = epochs, kept
        self.stopped_early, self.diverged = f.bool("stopped_early"), f.bool("diverged")
        self.stopped_by, self.best_epoch = f.str("stopped_by"), f.int("best_epoch", low=1, none=True)
        self.totals = UpdateStats.from_dict(f.raw("totals"), f.path("totals"))
        self.epoch_stats = UpdateStats.from_dict(f.raw("epoch_stats"), f.path("epoch_stats"))


def _record(saved: Any, where: str) -> UpdateRecord:
    f = Fields(saved, where)
    start = f.int("start")
    loss_start = f.int("loss_start", low=start)
    stop = f.int("stop", low=loss_start)
    loss, norm = f.raw("loss"), f.raw("grad_norm")
    for name, value in (("loss", loss), ("grad_norm", norm)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f.path(name), "a number", value)
    return UpdateRecord(start, loss_start, stop, float(loss), float(norm), f.number("wall_time", low=0.0),
                        f.bool("skipped"), f.str("reason"), f.int("k2", low=1, none=True) if "k2" in f.saved else None)
