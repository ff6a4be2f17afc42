"""What TBPTTModule checks before it trains: its parts, the Lightning Trainer's settings (before
Lightning's own checks run), the loaders, and that each batch is a segment of the streams. Every
error says what was given and what to do instead."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ..schedules import is_schedule
from .loader import SegmentBatch


def check_parts(model: Any, loss_fn: Any, optimizer: Any, scheduler: Any, schedule: Any,
                overridden: set[str]) -> None:
    """The module's parts; a subclass's ``overridden`` methods (forward, step_losses) stand in for
    the model and the loss."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if model is None and "forward" not in overridden:
        raise TypeError("TBPTTModule needs model= (forward(inputs, state) -> (outputs, state)), or a subclass "
                        "that overrides forward")
    if loss_fn is None and "step_losses" not in overridden:
        raise TypeError("TBPTTModule needs loss_fn= ((outputs, targets) -> per-step losses [B, T]), or a "
                        "subclass that overrides step_losses")
    for name, value, example in (("optimizer", optimizer, "lambda params: torch.optim.Adam(params, 1e-3)"),
                                 ("scheduler", scheduler, "lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10)")):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be a function that builds it, e.g. {name}={example}; got "
                            f"{type(value).__name__}")
    if not is_schedule(schedule):
        raise TypeError(f"schedule must be a tbptt.TBPTT, ARTBP or AdaptiveTBPTT, e.g. schedule=tbptt.TBPTT(5, 20); "
                        f"got {schedule!r}")


def as_segment(batch: Any, batch_idx: int, batches: float) -> SegmentBatch:
    """A batch as a segment of the streams; the last of a pass ends them."""
    last = batch_idx + 1 >= batches
    if isinstance(batch, SegmentBatch):
        return batch if batch.end_of_stream or not last else batch._replace(end_of_stream=True)
    if isinstance(batch, (tuple, list)) and 2 <= len(batch) <= 4 and all(
        t is None or isinstance(t, torch.Tensor) for t in batch
    ):
        inputs, targets, mask, resets = (*batch, None, None)[:4]
        return SegmentBatch(inputs, targets, mask, resets, None, last)
    raise TypeError(
        "TBPTTModule trains on segments of the streams: batches from tbptt.lightning.segments(...) or tuples "
        f"(inputs[B, T, ...], targets[, mask[, resets]]); got {type(batch).__name__}"
    )


def check_loaders(loaders: Any, argument: str) -> None:
    """One loader, which must not shuffle nor deal segments out to ranks."""
    flat = list(loaders.values()) if isinstance(loaders, dict) else (
        list(loaders) if isinstance(loaders, (list, tuple)) else [loaders])
    if len(flat) != 1:
        raise ValueError(f"TBPTTModule takes one loader of segments as {argument}; got {len(flat)}")
    loader = flat[0]
    if not isinstance(loader, DataLoader):
        return
    for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        if isinstance(sampler, RandomSampler) or getattr(sampler, "shuffle", False):
            raise ValueError(
                f"the {argument} loader shuffles ({type(sampler).__name__}), but each segment continues the "
                "streams of the one before it; use tbptt.lightning.segments(...) or DataLoader(..., shuffle=False)"
            )
        if isinstance(sampler, DistributedSampler):
            raise ValueError(
                f"the {argument} loader has a DistributedSampler (Lightning adds one under DDP), which deals "
                "segments, steps in time, out to the ranks; use tbptt.lightning.segments(...), which gives each "
                "rank its rows, every step of them"
            )


def check_trainer(trainer: Any, name: str, automatic: bool, clip_grad_norm: Optional[float]) -> Optional[float]:
    """Refuse what TBPTT under manual optimization cannot honour, before Lightning's own checks;
    return ``Trainer(gradient_clip_val=...)`` when it is to be used (by norm), else None."""
    if automatic:
        raise ValueError(
            f"{name} sets automatic_optimization=True, but TBPTTModule applies each TBPTT "
            "update itself (Lightning's manual optimization): leave automatic_optimization False and "
            "override forward and step_losses rather than training_step"
        )
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) cannot apply to TBPTT: an update "
            "is applied when the schedule closes its block (every k1 steps), not per batch. Remove it; to "
            "update less often raise k1 in schedule=TBPTT(k1, k2), or train more streams side by side"
        )
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ValueError(
            f"Trainer(precision={trainer.precision!r}) scales the loss with a GradScaler, which TBPTT's "
            "gradients (torch.autograd.grad per update) never pass through; use precision='bf16-mixed' or "
            "'32-true'"
        )
    clip = trainer.gradient_clip_val
    if not clip:
        return None
    algorithm = trainer.gradient_clip_algorithm
    if algorithm is not None and algorithm.value != "norm":
        raise ValueError(
            f"Trainer(gradient_clip_algorithm={algorithm.value!r}): TBPTTModule clips each update's gradient "
            "by its 2-norm; use gradient_clip_algorithm='norm' (or clip_grad_norm=)"
        )
    if clip_grad_norm is not None and clip_grad_norm != clip:
        raise ValueError(f"clip_grad_norm={clip_grad_norm} and Trainer(gradient_clip_val={clip}) disagree; give one")
    return float(clip)
