"""What training did: one record per update, and a run's ``History`` (epochs, updates, how it ended).

The trainer writes records, the fit loop collects them into a history, experiments and reports
read them. Nothing here knows how an update is computed.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .files import PathLike, atomic_write_text


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


@dataclass
class History:
    """What ``fit`` did: one dict per epoch, every update's record, and how it ended."""

    epochs: list[dict] = field(default_factory=list)
    updates: list[UpdateRecord] = field(default_factory=list)
    stopped_early: bool = False
    diverged: bool = False
    stopped_by: str = ""
    best_epoch: Optional[int] = None

    def k2(self) -> list[Optional[int]]:
        """The window each update was given, in order (``UpdateRecord.k2``): k2 over training."""
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
        """The history as plain data (for a checkpoint)."""
        return {**{k: v for k, v in asdict(self).items() if k != "updates"},
                "updates": [r.as_dict() for r in self.updates]}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Replace this history by one saved with ``state_dict``."""
        self.epochs = list(saved["epochs"])
        self.updates = [UpdateRecord(**r) for r in saved["updates"]]
        self.stopped_early, self.diverged = saved["stopped_early"], saved["diverged"]
        self.stopped_by, self.best_epoch = saved["stopped_by"], saved["best_epoch"]
