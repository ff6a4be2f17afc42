"""Mixed precision for the trainer: the model's forward under ``torch.autocast``, the losses in
float32, and for float16 a loss scale that keeps small gradients representable (Micikevicius et al.
2018, "Mixed Precision Training").

The weights and the optimizer stay float32: autocast casts them to the low precision inside each
model call. The model's outputs are cast back to float32 before ``loss_fn``, so per-step losses,
their masked mean and the reported loss are float32 whatever the forward ran at.

float16 (5 exponent bits) underflows gradients below ~6e-8 and overflows above 65504. The loss is
multiplied by a scale S before the backward pass, so the gradients computed in float16 are S times
larger, and divided by S again (exactly: S is a power of two) before the norm, clipping and the
step. S follows ``torch.amp.GradScaler``'s rule: halved when a scaled gradient overflows (that
update is skipped), doubled after 2000 updates in a row without one.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, ContextManager, Literal, Optional

import torch
from torch import nn

from .compensation import scale_gradient
from .contract import LossFn
from .saved import CheckpointError, Fields, bad
from .validate import InvalidArgument

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = ("fp32", "bf16", "fp16")
_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(model: nn.Module, precision: Precision) -> Callable[[], ContextManager[Any]]:
    """A factory of the context the model's calls run in at ``precision``: ``torch.autocast`` on the
    device of the model's first parameter (no-op for ``"fp32"``). A precision autocast does not
    support on that device is an ``InvalidArgument`` naming ``precision``, raised here."""
    if precision == "fp32":
        return nullcontext
    first = next(model.parameters(), None)
    device = first.device.type if first is not None else "cpu"
    dtype = _LOW[precision]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns and disables autocast for a dtype it lacks
        try:
            with torch.autocast(device_type=device, dtype=dtype):
                works = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == dtype
        except RuntimeError:
            works = False
    if not works:
        raise InvalidArgument("precision", precision, f"a precision torch.autocast supports on {device}",
                              "use 'fp32' there")
    context = partial(torch.autocast, device_type=device, dtype=dtype)
    _check_recurrent_layers(model, context, precision)
    return context


def _check_recurrent_layers(model: nn.Module, context: Callable[[], ContextManager[Any]], precision: str) -> None:
    """Run each fused recurrent layer (nn.LSTM/GRU/RNN) of ``model`` one step under ``context``, so
    that a kernel the device lacks at that dtype (oneDNN's float16 LSTM on most CPUs) is an
    ``InvalidArgument`` naming ``precision`` now rather than a failure at the first update."""
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.RNNBase):
            continue
        weight = next(layer.parameters())
        probe = torch.zeros(1, 1, layer.input_size, device=weight.device, dtype=weight.dtype)
        mode = layer.training
        try:
            # eval mode: no dropout draw moves the random generators; with gradient: training's kernel
            layer.eval()
            with torch.enable_grad(), context():
                layer(probe)
        except RuntimeError as exc:
            raise InvalidArgument("precision", precision, f"a precision {name or 'the model'} "
                                  f"({type(layer).__name__}) runs at on {weight.device.type}",
                                  f"its kernel failed ({str(exc).splitlines()[0]}); use 'bf16' or 'fp32'") from None
        finally:
            layer.train(mode)


class LossScaler:
    """The loss scale of float16 training, updated as ``torch.amp.GradScaler`` updates its own (the
    same defaults, the same ``state_dict`` keys), but driven by the trainer: it scales the gradient
    entering the model from the losses (``float32_losses``), ``unscale`` divides an update's
    gradient by the scale, and ``update`` takes whether that gradient was finite, known from the
    update's one host sync. The scale is a Python float, so scaling needs no sync of its own."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000) -> None:
        self.scale = _float32(init_scale)  # GradScaler holds its scale in float32
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.growth_tracker = 0  # updates in a row with a finite gradient

    def unscale(self, grads: dict[str, Optional[torch.Tensor]]) -> None:
        """Divide the gradients (computed at this scale) by the scale, in place."""
        present = [g for g in grads.values() if g is not None]
        if present:
            torch._foreach_mul_(present, 1.0 / self.scale)

    def update(self, finite: bool) -> float:
        """Lower the scale after an overflow, raise it after ``growth_interval`` finite updates in a
        row; the scale now."""
        if not finite:
            self.scale = _float32(self.scale * self.backoff_factor)
            self.growth_tracker = 0
        elif self.growth_tracker + 1 == self.growth_interval:
            grown = _float32(self.scale * self.growth_factor)
            if grown != float("inf"):
                self.scale = grown
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
        return self.scale

    def after_update(self, reason: str, finite_gradient: bool) -> tuple[str, bool]:
        """Update the scale after an update whose unscaled gradient was ``finite_gradient``, given
        the trainer's ``reason`` to refuse it (``""``: none); the reason as it stands now and whether
        the update is skipped even under ``nonfinite="raise"``. A non-finite gradient at a scale above
        1 is the scale's overflow, expected while it finds its level (it starts high on purpose): the
        reason says so and how the scale was lowered. At a scale of 1 or less the gradient overflows
        unscaled: it is the model's, and ``nonfinite`` decides."""
        scale = self.scale
        lowered = self.update(finite_gradient)
        if reason != "non-finite gradient":
            return reason, False
        if scale > 1:
            return f"non-finite gradient (fp16 overflow; loss scale lowered to {lowered:g})", True
        return f"non-finite gradient (even at fp16 loss scale {scale:g}; lowered to {lowered:g})", False

    def state_dict(self) -> dict[str, Any]:
        """The scale and its rule, under ``torch.amp.GradScaler.state_dict``'s keys."""
        return {"scale": self.scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": self.growth_tracker}

    def load_state_dict(self, saved: Any, where: str = "loss_scale") -> None:
        """Continue from ``state_dict()`` (or a ``GradScaler``'s), every field checked first: a bad
        one is a ``CheckpointError`` naming it under ``where``."""
        f = Fields(saved, where)
        scale, growth, backoff = (f.number(k, finite=True) for k in ("scale", "growth_factor", "backoff_factor"))
        interval = f.int("growth_interval", low=1)
        tracker = f.int("_growth_tracker", high=interval - 1)
        for key, ok, expected in (("scale", scale > 0, "a number > 0"), ("growth_factor", growth > 1, "a number > 1"),
                                  ("backoff_factor", 0 < backoff < 1, "a number in (0, 1)")):
            if not ok:
                raise bad(f.path(key), expected, f.saved[key])
        self.scale, self.growth_factor, self.backoff_factor = scale, growth, backoff
        self.growth_interval, self.growth_tracker = interval, tracker


def precision_state(precision: Precision, scaler: Optional[LossScaler]) -> dict[str, Any]:
    """What a trainer's checkpoint saves of its precision: the name and float16's loss scale."""
    return {"precision": precision, "loss_scale": None if scaler is None else scaler.state_dict()}


def saved_loss_scale(checkpoint: Fields, precision: Precision) -> Optional[dict[str, Any]]:
    """The loss scale saved in a trainer's checkpoint (``precision_state``), checked; None unless
    ``precision`` is ``"fp16"``. A checkpoint of another precision is a ``CheckpointError`` (one
    without the field was ``"fp32"``): the stored strategy's activations are recomputed on loading
    at the trainer's precision, and must be those of the run that saved them."""
    default = {"precision": "fp32", "loss_scale": None}
    f = Fields(checkpoint.saved.get("precision", default), checkpoint.path("precision"))
    saved = f.str("precision", PRECISIONS)
    if saved != precision:
        raise CheckpointError(f"the checkpoint was trained with precision {saved!r}, this trainer uses "
                              f"{precision!r}; resume with the same precision")
    if precision != "fp16":
        return None
    scaler = LossScaler()
    scaler.load_state_dict(f.raw("loss_scale"), f.path("loss_scale"))
    return scaler.state_dict()


def _float32(value: float) -> float:
    """``value`` rounded to float32, as GradScaler holds its scale."""
    return torch.tensor(value, dtype=torch.float32).item()


def float32_losses(loss_fn: LossFn, scaler: Optional[LossScaler] = None) -> LossFn:
    """``loss_fn`` on the model's outputs cast to float32 (float16 and bfloat16 ones), its per-step
    losses float32; with ``scaler``, the gradient flowing from the losses into the model is
    multiplied by the scale. The losses themselves are never scaled, so evaluation and the records
    see the true loss."""

    def losses(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = outputs.float() if isinstance(outputs, torch.Tensor) and outputs.dtype in _LOW.values() else outputs
        if scaler is not None and isinstance(x, torch.Tensor) and x.requires_grad:
            # read when the backward runs: a stored window's older segments get the current scale
            x = scale_gradient(x, lambda: scaler.scale)
        out = loss_fn(x, targets)
        return out.float() if isinstance(out, torch.Tensor) and out.dtype in _LOW.values() else out

    return losses
