"""Epochs of training on split streams: validation, schedulers, callbacks, early stopping,
logs, progress, checkpoints and resume. ``Trainer.fit`` and ``Trainer.evaluate`` call these.

A split is any object with ``inputs[B, T, ...]`` and ``targets`` and, optionally, ``mask`` and
``resets`` ``[B, T]`` (``tbptt.data.Split``); a tuple ``(inputs, targets[, mask[, resets]])`` works too.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence, Union

import torch

from . import checkpoint as ckpt
from . import state as st
from .contract import masked_sum, step_losses

if TYPE_CHECKING:
    from .trainer import Trainer, UpdateRecord

Metric = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], float]
PathLike = Union[str, os.PathLike]


@dataclass
class _Split:
    inputs: torch.Tensor
    targets: torch.Tensor
    mask: Optional[torch.Tensor] = None
    resets: Optional[torch.Tensor] = None


def as_split(data: Any, name: str = "data") -> _Split:
    """Read a split from an object with ``inputs``/``targets`` (mask, resets) or a tuple."""
    if isinstance(data, (tuple, list)):
        if not 2 <= len(data) <= 4:
            raise ValueError(f"{name} as a tuple must be (inputs, targets[, mask[, resets]]); got {len(data)} items")
        return _Split(*data)
    if hasattr(data, "inputs") and hasattr(data, "targets"):
        return _Split(data.inputs, data.targets, getattr(data, "mask", None), getattr(data, "resets", None))
    raise TypeError(
        f"{name} must have .inputs and .targets (a tbptt.data.Split) or be a tuple "
        f"(inputs, targets[, mask[, resets]]); got {type(data).__name__}"
    )


def _pieces(split: _Split, length: Optional[int]) -> list[tuple[int, int]]:
    n = split.inputs.shape[1]
    if length is None:
        return [(0, n)]
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"segment_length must be a positive int or None; got {length!r}")
    return [(a, min(a + length, n)) for a in range(0, n, length)]


def _cut(t: Optional[torch.Tensor], a: int, b: int) -> Optional[torch.Tensor]:
    return None if t is None else t[:, a:b]


class Callback(Protocol):
    """Hooks called by ``fit``; define either or both. ``on_epoch_end`` returning True stops."""

    def on_update(self, trainer: "Trainer", record: "UpdateRecord") -> None: ...

    def on_epoch_end(self, trainer: "Trainer", epoch: dict) -> Optional[bool]: ...


@dataclass
class History:
    """What ``fit`` did: one dict per epoch, every update's record, and how it ended."""

    epochs: list[dict] = field(default_factory=list)
    updates: list["UpdateRecord"] = field(default_factory=list)
    stopped_early: bool = False
    diverged: bool = False
    stopped_by: str = ""
    best_epoch: Optional[int] = None

    def write(self, path: PathLike) -> Path:
        """Write the epochs as JSON lines (``.jsonl``) or CSV (``.csv``), atomically."""
        path = Path(path)
        if path.suffix == ".jsonl":
            text = "".join(json.dumps(e) + "\n" for e in self.epochs)
        elif path.suffix == ".csv":
            buffer = io.StringIO()
            keys = list(self.epochs[0]) if self.epochs else []
            writer = csv.DictWriter(buffer, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.epochs)
            text = buffer.getvalue()
        else:
            raise ValueError(f"log must end in .jsonl or .csv; got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        return path

    def state(self) -> dict:
        from dataclasses import asdict

        return {**{k: v for k, v in asdict(self).items() if k != "updates"},
                "updates": [r.as_dict() for r in self.updates]}

    @classmethod
    def from_state(cls, saved: dict) -> "History":
        from .trainer import UpdateRecord

        return cls(**{**saved, "updates": [UpdateRecord(**r) for r in saved["updates"]]})


def evaluate(
    trainer: "Trainer", data: Any, metric: Optional[Metric] = None, segment_length: Optional[int] = None
) -> dict[str, float]:
    """Loss (mean over valid steps) and metric of the model on a split, state carried from a fresh
    start across the split, no gradient, in eval mode; the training streams are untouched."""
    split = as_split(data, "data")
    was_training = trainer.model.training
    trainer.model.eval()
    outputs = []
    total, count = 0.0, 0.0
    state: st.State = None
    try:
        with torch.no_grad():
            for a, b in _pieces(split, segment_length):
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


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fit(
    trainer: "Trainer",
    train: Any,
    epochs: int = 1,
    valid: Any = None,
    segment_length: Optional[int] = None,
    metric: Optional[Metric] = None,
    scheduler: Any = None,
    scheduler_interval: str = "epoch",
    callbacks: Sequence[Any] = (),
    patience: Optional[int] = None,
    restore_best: bool = False,
    checkpoint: Optional[PathLike] = None,
    checkpoint_every: Optional[int] = None,
    resume: bool = False,
    log: Optional[PathLike] = None,
    progress: Optional[bool] = None,
    max_seconds: Optional[float] = None,
) -> History:
    """See ``Trainer.fit``."""
    split = as_split(train, "train")
    valid_split = None if valid is None else as_split(valid, "valid")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int; got {epochs!r}")
    if scheduler_interval not in ("epoch", "update"):
        raise ValueError(f"scheduler_interval must be 'epoch' or 'update'; got {scheduler_interval!r}")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be a positive int or None; got {patience!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive int (updates) or None; got {checkpoint_every!r}")
    if (checkpoint_every or resume) and checkpoint is None:
        raise ValueError("checkpoint_every and resume need a checkpoint path")
    if checkpoint_every is not None and segment_length is None:
        raise ValueError(
            "checkpoint_every needs segment_length: checkpoints are taken between train_on calls, and "
            "without segment_length an epoch is a single call"
        )
    pieces = _pieces(split, segment_length)
    history = History()
    steps = int(split.inputs.shape[1])  # rows may be shared out over ranks; the time axis may not change
    progress_state: dict[str, Any] = {"epoch": 0, "piece": 0, "best": math.inf, "bad_epochs": 0,
                                      "elapsed": 0.0, "epoch_first_update": 0,
                                      "segment_length": segment_length, "steps": steps}
    best_weights: Optional[dict] = None

    def save() -> bool:
        """Write the checkpoint; False (and nothing written) if the weights are not finite."""
        assert checkpoint is not None
        state = trainer.state_dict()
        if not ckpt.finite(state["model"]):
            history.diverged, history.stopped_by = True, history.stopped_by or "diverged"
            return False
        trainer.save_checkpoint({
            **state,
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "fit": {**progress_state, "elapsed": progress_state["elapsed"] + time.perf_counter() - started},
            "history": history.state(),
            "best_weights": best_weights,
        }, checkpoint)
        return True

    if resume and checkpoint is not None and Path(checkpoint).exists():
        saved = trainer.load_checkpoint(checkpoint)
        ckpt.check_model(saved["model"], trainer.model, checkpoint)
        for key, mine in (("segment_length", segment_length), ("steps", steps)):
            if saved["fit"].get(key) != mine:
                raise ckpt.CheckpointError(
                    f"{checkpoint} was written with {key} {saved['fit'].get(key)} and this run has {mine}; "
                    "resume on the same data cut the same way, or start afresh"
                )
        try:
            trainer.load_state_dict(saved)
        except ValueError as exc:
            raise ckpt.CheckpointError(f"{checkpoint}: {exc}") from exc
        if scheduler is not None and saved["scheduler"] is not None:
            scheduler.load_state_dict(saved["scheduler"])
        progress_state.update(saved["fit"])
        history = History.from_state(saved["history"])
        history.epochs = [e for e in history.epochs if not e.get("partial")]  # that epoch goes on now
        history.stopped_by = ""
        best_weights = saved["best_weights"]
        ckpt.set_rng_state(saved["rng"])
    else:
        trainer.reset_state(flush=False)

    show = sys.stderr.isatty() if progress is None else progress
    started = time.perf_counter()
    since_save = 0
    stop = False
    while progress_state["epoch"] < epochs and not stop:
        epoch = progress_state["epoch"]
        epoch_started = time.perf_counter()
        if progress_state["piece"] == 0:
            progress_state["epoch_first_update"] = len(history.updates)
        first_update = progress_state["epoch_first_update"]
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pieces), initial=progress_state["piece"], desc=f"epoch {epoch + 1}/{epochs}",
                       leave=False, file=sys.stderr)
        out_of_time = False
        while progress_state["piece"] < len(pieces):
            i = progress_state["piece"]
            a, b = pieces[i]
            last = i == len(pieces) - 1
            records = trainer.train_on(split.inputs[:, a:b], split.targets[:, a:b], _cut(split.mask, a, b),
                                       end_of_stream=last, resets=_cut(split.resets, a, b))
            progress_state["piece"] = i + 1
            for record in records:
                history.updates.append(record)
                for cb in callbacks:
                    if hasattr(cb, "on_update"):
                        cb.on_update(trainer, record)
                if scheduler is not None and scheduler_interval == "update" and not record.skipped:
                    scheduler.step()
            since_save += len(records)
            if bar is not None:
                bar.update(1)
                if records:
                    bar.set_postfix(loss=f"{records[-1].loss:.4g}")
            if checkpoint_every is not None and since_save >= checkpoint_every and not last:
                since_save = 0
                if not save():
                    break
            if max_seconds is not None and trainer.agree_to_stop(
                progress_state["elapsed"] + time.perf_counter() - started > max_seconds
            ):
                history.stopped_by, stop, out_of_time = "max_seconds", True, not last
                break
        if bar is not None:
            bar.close()
        records = history.updates[first_update:]
        applied = [r for r in records if not r.skipped]
        info: dict[str, Any] = {
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
        if out_of_time:
            # stopped inside the epoch: reported as partial; the streams stay open, so that a
            # resume from the checkpoint goes on with the rest of this epoch
            info["partial"] = True
        if valid_split is not None:
            result = evaluate(trainer, valid_split, metric, segment_length)
            info["valid_loss"] = result["loss"]
            if "metric" in result:
                info["valid_metric"] = result["metric"]
        monitored = info.get("valid_loss", info["train_loss"])
        if not math.isfinite(monitored) or any("non-finite" in r.reason for r in records):
            history.diverged = True
        info["epoch_time"] = time.perf_counter() - epoch_started
        info["wall_time"] = progress_state["elapsed"] + time.perf_counter() - started
        history.epochs.append(info)
        if not out_of_time:
            progress_state["epoch"], progress_state["piece"] = epoch + 1, 0
            if scheduler is not None and scheduler_interval == "epoch":
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(monitored)
                else:
                    scheduler.step()
            if math.isfinite(monitored) and monitored < progress_state["best"]:
                progress_state["best"], progress_state["bad_epochs"] = monitored, 0
                history.best_epoch = epoch + 1
                if restore_best:
                    best_weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            else:
                progress_state["bad_epochs"] += 1
                if patience is not None and progress_state["bad_epochs"] >= patience:
                    history.stopped_early, history.stopped_by, stop = True, "patience", True
        for cb in callbacks:
            if hasattr(cb, "on_epoch_end") and cb.on_epoch_end(trainer, info):
                history.stopped_by, stop = history.stopped_by or "callback", True
        if history.diverged:
            history.stopped_by, stop = history.stopped_by or "diverged", True
        if trainer.agree_to_stop(stop) and not stop:
            history.stopped_by, stop = "another process", True
        if log is not None:
            history.write(log)
        if checkpoint is not None and not history.diverged:
            save()
            since_save = 0
    if restore_best and best_weights is not None:
        trainer.model.load_state_dict(best_weights)
    return history
