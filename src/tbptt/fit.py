"""Epochs of training on split streams: validation, schedulers, callbacks, early stopping, logs,
progress, checkpoints and resume. ``Trainer.fit`` and ``Trainer.evaluate`` run these.

The loop drives a trainer through the few methods ``FitTrainer`` lists (the ``Trainer`` and
``DistributedTrainer`` have them), so it knows nothing of how an update is computed. Its position
(epoch, segment, early-stopping counters, elapsed time) is a ``FitProgress``, saved with every
checkpoint so that a resumed run goes on from the same segment.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union

import torch

from . import checkpoint as ckpt
from .budget import Budget, BudgetMeter
from .contract import Metric, masked_sum, step_losses
from .data.streams import Split, as_split
from .engine import StreamEngine
from .files import PathLike
from .records import History, UpdateRecord
from .validate import InvalidArgument, non_negative_number, one_of, positive_int


class FitTrainer(Protocol):
    """What the fit loop needs of a trainer."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    engine: StreamEngine

    @property
    def position(self) -> int: ...

    budget: Optional[BudgetMeter]

    @property
    def pending(self) -> bool: ...

    def train_on(self, inputs: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 end_of_stream: bool = False, resets: Optional[torch.Tensor] = None,
                 max_updates: Optional[int] = None) -> list[UpdateRecord]: ...

    def train_pending(self, max_updates: Optional[int] = None) -> list[UpdateRecord]: ...

    def reset_state(self, flush: bool = True) -> list[UpdateRecord]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, saved: dict) -> None: ...

    def save_checkpoint(self, payload: dict, path: Any) -> None: ...

    def load_checkpoint(self, path: Any) -> dict: ...

    def agree_to_stop(self, stop: bool) -> bool: ...


class Callback(Protocol):
    """Hooks called by ``fit``; define either or both. ``on_epoch_end`` returning True stops."""

    def on_update(self, trainer: Any, record: UpdateRecord) -> None: ...

    def on_epoch_end(self, trainer: Any, epoch: dict) -> Optional[bool]: ...


@dataclass(frozen=True)
class FitOptions:
    """``Trainer.fit``'s options, checked before any work (see ``Trainer.fit`` for each)."""

    epochs: Optional[int] = None
    segment_length: Optional[int] = None
    metric: Optional[Metric] = None
    scheduler: Any = None
    scheduler_interval: str = "epoch"
    callbacks: Sequence[Any] = ()
    patience: Optional[int] = None
    restore_best: bool = False
    checkpoint: Optional[PathLike] = None
    checkpoint_every: Optional[int] = None
    resume: bool = False
    log: Optional[PathLike] = None
    progress: Optional[bool] = None
    max_seconds: Optional[float] = None
    budget: Union[None, str, Budget] = None

    def __post_init__(self) -> None:
        budget = None if self.budget is None else Budget.parse(self.budget)
        object.__setattr__(self, "budget", budget)
        positive_int(self.epochs, "epochs", none="1, or until the budget runs out when there is one")
        if budget is not None and budget.kind == "epochs":
            if self.epochs is not None and self.epochs != budget.amount:
                raise InvalidArgument("epochs", self.epochs, f"left out or {budget.amount} with budget {budget}",
                                      mentions=("budget",))
            object.__setattr__(self, "epochs", budget.amount)
        elif self.epochs is None and budget is None and self.max_seconds is None:
            object.__setattr__(self, "epochs", 1)
        positive_int(self.segment_length, "segment_length", "steps per train_on call", "the whole split")
        one_of(self.scheduler_interval, "scheduler_interval", ("epoch", "update"))
        positive_int(self.patience, "patience", "epochs without improvement", "no early stopping")
        positive_int(self.checkpoint_every, "checkpoint_every", "updates", "only at the end of each epoch")
        non_negative_number(self.max_seconds, "max_seconds", "seconds of training", "no time budget")
        if (self.checkpoint_every or self.resume) and self.checkpoint is None:
            name = "checkpoint_every" if self.checkpoint_every else "resume"
            what = "a path to save to" if self.checkpoint_every else "the path to resume from"
            raise InvalidArgument(name, getattr(self, name), f"given together with checkpoint ({what})",
                                  mentions=("checkpoint",))

    def budgets(self) -> list[Budget]:
        """Every limit on the fit: ``budget``, ``max_seconds`` and ``epochs``."""
        found = [] if self.budget is None or self.budget.kind == "epochs" else [self.budget]
        if self.max_seconds is not None:
            found.append(Budget("seconds", self.max_seconds))
        if self.epochs is not None:
            found.append(Budget("epochs", self.epochs))
        return found


@dataclass
class FitProgress:
    """Where a fit stands: the epoch and the next segment in it, early stopping's best monitored
    loss and epochs without improvement, seconds trained before this process, what was spent of the
    budgets, and how the data were cut (a resume must cut them the same way)."""

    epoch: int = 0
    piece: int = 0
    best: float = math.inf
    bad_epochs: int = 0
    elapsed: float = 0.0
    spent: dict = field(default_factory=dict)
    epoch_first_update: int = 0
    segment_length: Optional[int] = None
    steps: int = 0


def pieces(steps: int, length: Optional[int]) -> list[tuple[int, int]]:
    """The ``[a, b)`` ranges of the time axis that each ``train_on`` call gets."""
    if length is None:
        return [(0, steps)]
    return [(a, min(a + length, steps)) for a in range(0, steps, length)]


def _cut(t: Optional[torch.Tensor], a: int, b: int) -> Optional[torch.Tensor]:
    return None if t is None else t[:, a:b]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def evaluate(
    trainer: FitTrainer, data: Any, metric: Optional[Metric] = None, segment_length: Optional[int] = None
) -> dict[str, float]:
    """Loss (mean over valid steps) and metric of the model on a split, state carried from a fresh
    start across the split, no gradient, in eval mode; the training streams are untouched."""
    split = as_split(data, "data")
    positive_int(segment_length, "segment_length", "steps per call", "the whole split")
    was_training = trainer.model.training
    trainer.model.eval()
    outputs = []
    total, count = 0.0, 0.0
    state: Any = None
    try:
        with torch.no_grad():
            for a, b in pieces(split.steps, segment_length):
                out, state = trainer.engine.forward(split.inputs[:, a:b], state, _cut(split.resets, a, b))
                mask = _cut(split.mask, a, b)
                s, c = masked_sum(step_losses(trainer.engine.loss_fn, out, split.targets[:, a:b], mask), mask)
                total += float(s)
                count += float(c)
                if metric is not None:
                    outputs.append(out)
    finally:
        trainer.model.train(was_training)
    result = {"loss": total / max(count, 1.0)}
    if metric is not None:
        result["metric"] = float(metric(torch.cat(outputs, dim=1), split.targets, split.mask))
    return result


def epoch_summary(trainer: FitTrainer, epoch: int, records: list[UpdateRecord]) -> dict[str, Any]:
    """The training half of an epoch's row in the history."""
    applied = [r for r in records if not r.skipped]
    return {
        "epoch": epoch + 1,
        "train_loss": statistics.fmean(r.loss for r in applied) if applied else float("nan"),
        "updates": len(records),
        "skipped": len(records) - len(applied),
        "grad_norm_median": _median([r.grad_norm for r in records]),
        "grad_norm_max": max((r.grad_norm for r in records), default=float("nan")),
        "forward_steps": trainer.engine.forward_steps,
        "backward_steps": trainer.engine.backward_steps,
        "lr": trainer.optimizer.param_groups[0]["lr"],
    }


class FitLoop:
    """One ``fit``: resume or start, then epochs of segments until done or told to stop."""

    def __init__(self, trainer: FitTrainer, train: Any, valid: Any, options: FitOptions) -> None:
        self.trainer, self.options = trainer, options
        self.split: Split = as_split(train, "train")
        self.valid: Optional[Split] = None if valid is None else as_split(valid, "valid")
        self.pieces = pieces(self.split.steps, options.segment_length)
        # rows may be shared out over ranks; the time axis may not change
        self.progress = FitProgress(segment_length=options.segment_length, steps=self.split.steps)
        self.history = History()
        self.best_weights: Optional[dict] = None
        self.started = time.perf_counter()
        self.since_save = 0
        self.stop = False
        self.meter = BudgetMeter(options.budgets(), lambda: trainer.engine.backward_steps)

    # ------------------------------------------------------------------------------------------
    def run(self) -> History:
        o = self.options
        if o.resume and o.checkpoint is not None and Path(o.checkpoint).exists():
            self._resume()
        else:
            self.trainer.reset_state(flush=False)
        self.started = time.perf_counter()
        self.meter.load_state_dict(self.progress.spent)
        self.meter.start()
        outer, self.trainer.budget = self.trainer.budget, self.meter
        try:
            while (o.epochs is None or self.progress.epoch < o.epochs) and not self.stop:
                if self._out_of_budget():
                    break
                epoch_started = time.perf_counter()
                if self.progress.piece == 0:
                    self.progress.epoch_first_update = len(self.history.updates)
                out_of_time = self._run_epoch()
                self._end_epoch(out_of_time, epoch_started)
        finally:
            self.trainer.budget = outer
        if o.restore_best and self.best_weights is not None:
            self.trainer.model.load_state_dict(self.best_weights)
        return self.history

    def elapsed(self) -> float:
        """Seconds trained in all, earlier processes of a resumed run included."""
        return self.progress.elapsed + time.perf_counter() - self.started

    # ------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        o, trainer = self.options, self.trainer
        saved = trainer.load_checkpoint(o.checkpoint)
        ckpt.check_model(saved["model"], trainer.model, o.checkpoint)
        for key in ("segment_length", "steps"):
            theirs, mine = saved["fit"].get(key), getattr(self.progress, key)
            if theirs != mine:
                raise ckpt.CheckpointError(
                    f"{o.checkpoint} was written with {key} {theirs} and this run has {mine}; "
                    "resume on the same data cut the same way, or start afresh"
                )
        try:
            trainer.load_state_dict(saved)
        except ValueError as exc:
            raise ckpt.CheckpointError(f"{o.checkpoint}: {exc}") from exc
        if o.scheduler is not None and saved["scheduler"] is not None:
            o.scheduler.load_state_dict(saved["scheduler"])
        self.progress = FitProgress(**saved["fit"])
        self.history.load_state_dict(saved["history"])
        self.history.epochs = [e for e in self.history.epochs if not e.get("partial")]  # that epoch goes on now
        self.history.stopped_by = ""
        self.best_weights = saved["best_weights"]
        ckpt.set_rng_state(saved["rng"])

    def _save(self) -> bool:
        """Write the checkpoint; False (and nothing written) if the weights are not finite."""
        o, trainer = self.options, self.trainer
        assert o.checkpoint is not None
        state = trainer.state_dict()
        if not ckpt.finite(state["model"]):
            self.history.diverged, self.history.stopped_by = True, self.history.stopped_by or "diverged"
            return False
        trainer.save_checkpoint({
            **state,
            "scheduler": None if o.scheduler is None else o.scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "fit": {**asdict(self.progress), "elapsed": self.elapsed(), "spent": self.meter.state_dict()},
            "history": self.history.state_dict(),
            "best_weights": self.best_weights,
        }, o.checkpoint)
        return True

    # ------------------------------------------------------------------------------------------
    def _progress_bar(self) -> Optional["_Bar"]:
        o = self.options
        show = sys.stderr.isatty() if o.progress is None else o.progress
        if not show:
            return None
        of = "" if o.epochs is None else f"/{o.epochs}"
        return _Bar(len(self.pieces), self.progress.piece, f"epoch {self.progress.epoch + 1}{of}")

    def _out_of_budget(self) -> bool:
        """Whether a budget is spent (all ranks agreeing); if so the fit stops, saying which."""
        meter = self.meter
        if not (meter.stops_updates and self.trainer.agree_to_stop(meter.should_stop())):
            return False
        seconds = self.options.max_seconds
        by_clock = seconds is not None and meter.stopped_by == str(Budget("seconds", seconds))
        # the budget of another rank, when this one's is not spent
        self.history.stopped_by = "max_seconds" if by_clock else (meter.stopped_by or "another process")
        self.stop = True
        return True

    def _run_epoch(self) -> bool:
        """Make the updates a stop left pending, then feed the epoch's remaining segments; True if a
        budget stopped it inside."""
        o, p, trainer = self.options, self.progress, self.trainer
        bar = self._progress_bar()
        try:
            while trainer.pending or p.piece < len(self.pieces):
                if self._out_of_budget():
                    return True
                room = None if o.checkpoint_every is None else max(1, o.checkpoint_every - self.since_save)
                if trainer.pending:
                    records = self._record(trainer.train_pending(room))
                else:
                    records = self._train_piece(*self.pieces[p.piece], p.piece == len(self.pieces) - 1, room)
                if bar is not None:
                    bar.advance(records[-1].loss if records else None, p.piece)
                more = trainer.pending or p.piece < len(self.pieces)
                if o.checkpoint_every is not None and self.since_save >= o.checkpoint_every and more:
                    self.since_save = 0
                    if not self._save():
                        return False
            return False
        finally:
            if bar is not None:
                bar.close()

    def _train_piece(self, a: int, b: int, last: bool, room: Optional[int]) -> list[UpdateRecord]:
        split = self.split
        records = self.trainer.train_on(split.inputs[:, a:b], split.targets[:, a:b], _cut(split.mask, a, b),
                                        end_of_stream=last, resets=_cut(split.resets, a, b), max_updates=room)
        self.progress.piece += 1
        return self._record(records)

    def _record(self, records: list[UpdateRecord]) -> list[UpdateRecord]:
        o = self.options
        for record in records:
            self.history.updates.append(record)
            for cb in o.callbacks:
                if hasattr(cb, "on_update"):
                    cb.on_update(self.trainer, record)
            if o.scheduler is not None and o.scheduler_interval == "update" and not record.skipped:
                o.scheduler.step()
        self.since_save += len(records)
        return records

    def _end_epoch(self, out_of_time: bool, epoch_started: float) -> None:
        o, p, history = self.options, self.progress, self.history
        records = history.updates[p.epoch_first_update:]
        info = epoch_summary(self.trainer, p.epoch, records)
        if out_of_time:
            # stopped inside the epoch: reported as partial; the streams stay open, so that a
            # resume from the checkpoint goes on with the rest of this epoch
            info["partial"] = True
        if self.valid is not None:
            result = evaluate(self.trainer, self.valid, o.metric, o.segment_length)
            info["valid_loss"] = result["loss"]
            if "metric" in result:
                info["valid_metric"] = result["metric"]
        monitored = info.get("valid_loss", info["train_loss"])
        if not math.isfinite(monitored) or any("non-finite" in r.reason for r in records):
            history.diverged = True
        info["epoch_time"] = time.perf_counter() - epoch_started
        info["wall_time"] = self.elapsed()
        info["train_cpu"] = self.meter.spent("cpu")
        history.epochs.append(info)
        if not out_of_time:
            self._close_epoch(monitored)
        self._decide_stop(info)
        if o.log is not None:
            history.write(o.log)
        if o.checkpoint is not None and not history.diverged:
            self._save()
            self.since_save = 0

    def _close_epoch(self, monitored: float) -> None:
        """A whole epoch is done: step the epoch scheduler and keep early stopping's count."""
        o, p = self.options, self.progress
        p.epoch, p.piece = p.epoch + 1, 0
        self.meter.epoch_done()
        if o.scheduler is not None and o.scheduler_interval == "epoch":
            if isinstance(o.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                o.scheduler.step(monitored)
            else:
                o.scheduler.step()
        if math.isfinite(monitored) and monitored < p.best:
            p.best, p.bad_epochs = monitored, 0
            self.history.best_epoch = p.epoch
            if o.restore_best:
                self.best_weights = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}
        else:
            p.bad_epochs += 1
            if o.patience is not None and p.bad_epochs >= o.patience:
                self.history.stopped_early, self.history.stopped_by, self.stop = True, "patience", True

    def _decide_stop(self, info: dict) -> None:
        history = self.history
        for cb in self.options.callbacks:
            if hasattr(cb, "on_epoch_end") and cb.on_epoch_end(self.trainer, info):
                history.stopped_by, self.stop = history.stopped_by or "callback", True
        if history.diverged:
            history.stopped_by, self.stop = history.stopped_by or "diverged", True
        if self.trainer.agree_to_stop(self.stop) and not self.stop:
            history.stopped_by, self.stop = "another process", True


class _Bar:
    """An epoch's segments as a transient progress bar on standard error (rich)."""

    def __init__(self, total: int, done: int, description: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[loss]}"), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
        self.task = self.progress.add_task(description, total=total, completed=done, loss="")
        self.progress.start()

    def advance(self, loss: Optional[float], done: int) -> None:
        self.progress.update(self.task, completed=done, **({} if loss is None else {"loss": f"loss {loss:.4g}"}))

    def close(self) -> None:
        self.progress.stop()


def fit(trainer: FitTrainer, train: Any, valid: Any = None, **options: Any) -> History:
    """Run ``FitLoop`` with ``FitOptions(**options)``; see ``Trainer.fit``."""
    return FitLoop(trainer, train, valid, FitOptions(**options)).run()
