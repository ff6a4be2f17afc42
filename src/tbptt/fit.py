"""Epochs of training on split streams: validation, schedulers, callbacks, early stopping, logs,
progress, checkpoints and resume. ``Trainer.fit`` and ``Trainer.evaluate`` run these.

The loop drives a trainer through the few methods ``FitTrainer`` lists (the ``Trainer`` and
``DistributedTrainer`` have them), so it knows nothing of how an update is computed. Its position
(epoch, segment, early-stopping counters, elapsed time) is a ``FitProgress``, saved with every
checkpoint so that a resumed run goes on from the same segment.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import torch

from . import checkpoint as ckpt
from .budget import Budget, BudgetMeter
from .contract import Metric, masked_sum, step_losses
from .data.streams import Split, as_split
from .engine import StreamEngine
from .files import PathLike, check_writable
from .memory import check_graph_memory
from .records import History, UpdateRecord, UpdateStats
from .saved import CheckpointError, Fields, plain
from .validate import InvalidArgument, non_negative_number, one_of, positive_int


class FitTrainer(Protocol):
    """What the fit loop needs of a trainer."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    engine: StreamEngine

    @property
    def position(self) -> int: ...

    budget: Optional[BudgetMeter]
    on_record: Optional[Callable[[UpdateRecord], None]]

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

    def data_fingerprint(self, split: Split) -> dict: ...


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
    keep_updates: bool = False
    allow_data_change: bool = False
    max_graph_bytes: Optional[int] = None
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
        for flag in ("restore_best", "resume", "keep_updates", "allow_data_change"):
            one_of(getattr(self, flag), flag, (False, True))
        one_of(self.progress, "progress", (None, False, True))
        positive_int(self.max_graph_bytes, "max_graph_bytes", "bytes", "the memory available on the device")
        if self.log is not None and Path(self.log).suffix not in (".jsonl", ".csv"):
            raise InvalidArgument("log", str(self.log), "a path ending in .jsonl or .csv")
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
    budgets, how the data were cut (a resume must cut them the same way) and the training data's
    fingerprint (``Split.fingerprint``: a resume on other data is refused unless allowed)."""

    epoch: int = 0
    piece: int = 0
    best: float = math.inf
    bad_epochs: int = 0
    elapsed: float = 0.0
    spent: dict = field(default_factory=dict)
    segment_length: Optional[int] = None
    steps: int = 0
    data: Optional[dict] = None

    @classmethod
    def from_dict(cls, saved: Any, pieces: int) -> "FitProgress":
        """The progress a checkpoint saved, every field checked (``CheckpointError`` naming it)."""
        f = Fields(saved, "fit")
        return cls(epoch=f.int("epoch"), piece=f.int("piece", high=pieces), best=f.number("best"),
                   bad_epochs=f.int("bad_epochs"), elapsed=f.number("elapsed", low=0.0, finite=True),
                   segment_length=f.int("segment_length", low=1, none=True), steps=f.int("steps", low=1),
                   data=plain(f.dict("data", none=True), f.path("data")), spent=_spent(f))


def _spent(f: Fields) -> dict:
    """What a run spent of its budgets (``BudgetMeter.state_dict``); none before budgets were saved."""
    if "spent" not in f.saved:
        return {}
    spent = Fields(f.raw("spent"), f.path("spent"))
    return {kind: spent.number(kind, low=0.0, finite=True) for kind in spent.saved}


def pieces(steps: int, length: Optional[int]) -> list[tuple[int, int]]:
    """The ``[a, b)`` ranges of the time axis that each ``train_on`` call gets."""
    if length is None:
        return [(0, steps)]
    return [(a, min(a + length, steps)) for a in range(0, steps, length)]


def _cut(t: Optional[torch.Tensor], a: int, b: int) -> Optional[torch.Tensor]:
    return None if t is None else t[:, a:b]


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


def epoch_summary(trainer: FitTrainer, epoch: int, stats: UpdateStats) -> dict[str, Any]:
    """The training half of an epoch's row in the history, from the summary of its updates."""
    return {
        "epoch": epoch + 1,
        "train_loss": stats.train_loss,
        "updates": stats.updates,
        "skipped": stats.skipped,
        "grad_norm_median": stats.grad_norm_median,
        "grad_norm_max": stats.norm_max,
        # the window the updates were given: k2, ARTBP's L drawn, AdaptiveTBPTT's k2 in force (None: n)
        "k2_mean": stats.k2_mean,
        "k2_last": stats.k2_last,
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
        self.history = History(records=[] if options.keep_updates else None)
        self.best_weights: Optional[dict] = None
        self.started = time.perf_counter()
        self.since_save = 0
        self.stop = False
        self.meter = BudgetMeter(options.budgets(), lambda: trainer.engine.backward_steps)

    # ------------------------------------------------------------------------------------------
    def run(self) -> History:
        o = self.options
        # everything that could fail later is checked before the first update
        for path, name in ((o.log, "log"), (o.checkpoint, "checkpoint")):
            if path is not None:
                check_writable(path, name)
        self.progress.data = self.trainer.data_fingerprint(self.split)
        if o.resume and o.checkpoint is not None and Path(o.checkpoint).exists():
            self._resume()
        else:
            self.trainer.reset_state(flush=False)
        check_graph_memory(self.trainer.engine, self.split.inputs[:, : (self.pieces[0][1])], self.split.steps,
                           o.max_graph_bytes)
        self.started = time.perf_counter()
        self.meter.load_state_dict(self.progress.spent)
        self.meter.start()
        outer, self.trainer.budget = self.trainer.budget, self.meter
        hook, self.trainer.on_record = self.trainer.on_record, self._on_update
        try:
            while (o.epochs is None or self.progress.epoch < o.epochs) and not self.stop:
                if self._out_of_budget():
                    break
                epoch_started = time.perf_counter()
                out_of_time = self._run_epoch()
                self._end_epoch(out_of_time, epoch_started)
        finally:
            self.trainer.budget, self.trainer.on_record = outer, hook
        if o.restore_best and self.best_weights is not None:
            self.trainer.model.load_state_dict(self.best_weights)
        return self.history

    def elapsed(self) -> float:
        """Seconds trained in all, earlier processes of a resumed run included."""
        return self.progress.elapsed + time.perf_counter() - self.started

    # ------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        """Continue from the checkpoint, every field of it checked first: a missing, mistyped or
        impossible one, or a checkpoint of other data, is a ``CheckpointError`` naming it."""
        o = self.options
        path = str(o.checkpoint)
        try:
            self._load(self.trainer.load_checkpoint(o.checkpoint))
        except CheckpointError as exc:
            if path in str(exc):
                raise
            raise CheckpointError(f"{path}: {exc}") from exc

    def _load(self, saved: Any) -> None:
        """Check every part of ``saved``, then load them all: a refused checkpoint changes nothing."""
        o, trainer = self.options, self.trainer
        f = Fields(saved, "")
        ckpt.check_model(f.raw("model"), trainer.model)
        progress = FitProgress.from_dict(f.raw("fit"), len(self.pieces))
        for key in ("segment_length", "steps"):
            theirs, mine = getattr(progress, key), getattr(self.progress, key)
            if theirs != mine:
                raise CheckpointError(f"it was written with {key} {theirs} and this run has {mine}; "
                                      "resume on the same data cut the same way, or start afresh")
        if progress.data != self.progress.data and not o.allow_data_change:
            raise CheckpointError(_other_data(progress.data, self.progress.data))
        progress.data = self.progress.data
        history = History(records=self.history.records)
        history.load_state_dict(f.raw("history"))
        best = f.raw("best_weights")
        if best is not None:
            ckpt.check_model(best, trainer.model, field="best_weights")
        scheduler = f.dict("scheduler", none=True)
        if o.scheduler is not None and scheduler is not None:
            _check_scheduler(o.scheduler, scheduler)
        ckpt.check_rng_state(f.raw("rng"))
        trainer.load_state_dict(saved)
        if o.scheduler is not None and scheduler is not None:
            o.scheduler.load_state_dict(scheduler)
        history.epochs = [e for e in history.epochs if not e.get("partial")]  # that epoch goes on now
        history.stopped_by = ""
        self.history, self.progress, self.best_weights = history, progress, best
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
        self.since_save += len(records)
        return records

    def _on_update(self, record: UpdateRecord) -> None:
        """Right after each update, before the next: the history, callbacks, a per-update scheduler
        (so that every update of a segment trains at the learning rate its place in the run gives)."""
        o = self.options
        self.history.add(record)
        for cb in o.callbacks:
            if hasattr(cb, "on_update"):
                cb.on_update(self.trainer, record)
        if o.scheduler is not None and o.scheduler_interval == "update" and not record.skipped:
            o.scheduler.step()

    def _end_epoch(self, out_of_time: bool, epoch_started: float) -> None:
        o, p, history = self.options, self.progress, self.history
        info = epoch_summary(self.trainer, p.epoch, history.epoch_stats)
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
        if not math.isfinite(monitored) or history.epoch_stats.nonfinite:
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
        self.history.close_epoch()
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


def _other_data(saved: Optional[dict], mine: Optional[dict]) -> str:
    """Why a checkpoint's training data are not this run's, in words."""
    what = "values"
    if saved is None or mine is None:
        what = "fingerprint"
    elif saved.get("shapes") != mine.get("shapes"):
        what = f"shapes ({saved.get('shapes')} then, {mine.get('shapes')} now)"
    elif saved.get("dtypes") != mine.get("dtypes"):
        what = f"dtypes ({saved.get('dtypes')} then, {mine.get('dtypes')} now)"
    return (f"it was written while training on other data (their {what} differ); resume on the same "
            "data, or pass allow_data_change=True (tbptt train: --allow-data-change) to go on with these")


def _check_scheduler(scheduler: Any, saved: dict) -> None:
    """Raise a ``CheckpointError`` unless a scheduler's saved state has its own fields, of their kinds."""
    mine = scheduler.state_dict()
    for key, value in mine.items():
        if key not in saved:
            raise CheckpointError(f"checkpoint field scheduler.{key} is missing (was the checkpoint written with "
                                  f"another scheduler than {type(scheduler).__name__}?)")
        theirs = saved[key]
        numbers = (int, float)
        same = (isinstance(theirs, numbers) and isinstance(value, numbers) and not isinstance(theirs, bool)) or (
            type(theirs) is type(value)) or value is None or theirs is None
        if not same or (isinstance(value, (list, tuple)) and len(theirs) != len(value)):
            raise CheckpointError(f"checkpoint field scheduler.{key} must be like {value!r}; got {theirs!r}")


def fit(trainer: FitTrainer, train: Any, valid: Any = None, **options: Any) -> History:
    """Run ``FitLoop`` with ``FitOptions(**options)``; see ``Trainer.fit``."""
    return FitLoop(trainer, train, valid, FitOptions(**options)).run()
