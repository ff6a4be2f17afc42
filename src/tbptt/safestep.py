"""An optimizer step that can be taken back, and the checks that an optimizer can train the model.

``StepUndo`` copies the weights and the optimizer's state before a step (one fused copy) and puts
them back if the step is refused, so a step that leaves a weight non-finite leaves no trace: the
weights and every moment, step count and buffer of the optimizer are as before it.
``check_optimizer`` refuses, before any work, an optimizer that would train nothing or only part
of the model, or whose hyper-parameters the weights' dtype cannot hold (``lr=1e308`` for float32).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .saved import CheckpointError, Fields, bad, integer, like
from .validate import InvalidArgument


def _numbers(value: Any) -> Iterable[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return [float(value)]
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _numbers(v)]
    return []


def check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Raise an ``InvalidArgument`` naming the problem unless ``optimizer`` holds every trainable
    parameter of ``model`` and its numeric hyper-parameters are finite and within the range of the
    weights' dtype."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if id(p) not in held]
    if trainable and len(missing) == len(trainable):
        raise InvalidArgument(
            "optimizer", type(optimizer).__name__, "an optimizer over the model's parameters",
            "it holds none of them, so training would change nothing: build it from model.parameters() "
            "(of this model, after moving it to its device and dtype)")
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InvalidArgument(
            "optimizer", type(optimizer).__name__, "an optimizer over all the model's trainable parameters",
            f"it does not hold {shown}, which would never change; add them, or freeze them with "
            "requires_grad_(False)")
    bad = _out_of_range(optimizer.param_groups, optimizer.param_groups)
    if bad is not None:
        index, key, value, expected = bad
        raise InvalidArgument(key, value, expected,
                              f"in param group {index} of the optimizer; a step of that size overflows the weights")


def _out_of_range(groups: list, owners: list) -> Any:
    """The first numeric hyper-parameter of ``groups`` that is not finite or that the dtype of the
    weights of ``owners`` (the optimizer's own groups) cannot hold: (group, key, value, expected)."""
    for index, (group, owner) in enumerate(zip(groups, owners)):
        dtypes = {p.dtype for p in owner["params"] if p.is_floating_point()}
        largest = min((torch.finfo(d).max for d in dtypes), default=math.inf)
        for key, value in group.items():
            if key in ("params", "param_names"):
                continue
            for number in _numbers(value):
                if not math.isfinite(number) or abs(number) > largest:
                    kind = "/".join(sorted(str(d).replace("torch.", "") for d in dtypes))
                    return index, key, value, f"a finite number that {kind} weights can hold (|{key}| <= {largest:.3g})"
    return None


class StepUndo:
    """The weights and the optimizer's state as they were before a step, to put back if the step is
    refused (``save`` before it, ``restore`` after it)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._entries: dict[Any, dict] = {}
        self._tensors: list[torch.Tensor] = []
        self._copies: list[torch.Tensor] = []
        self._saved = False
        self.bound: Optional[float] = None
        """An upper bound on the weights' 2-norm (None: unknown), kept without a pass over them."""

    def take_bounded_step(self, rate: float, step_norm: float, params: list[nn.Parameter]) -> bool:
        """Whether a plain SGD step of learning rate ``rate`` on a gradient of 2-norm ``step_norm``
        (after clipping) provably leaves every weight finite, so that it needs no copy before it and
        no check after it (``sgd_step_bound``); if so, the bound on the weights grows by the step."""
        if self.bound is None:
            value = float(total_norm(params))  # once, and after any step that was checked instead
            self.bound = value if math.isfinite(value) else None
        if self.bound is None or not params:
            return False
        dtypes = {p.dtype for p in params}
        if not all(d.is_floating_point for d in dtypes):
            return False
        # the narrowest dtype's range, and a margin above the coarsest one's rounding
        limit = min(torch.finfo(d).max for d in dtypes) / 4
        margin = max(1e-3, 2 * max(torch.finfo(d).eps for d in dtypes))
        grown = sgd_step_bound(self.bound, rate, step_norm, margin)
        if not grown < limit:
            self.bound = None  # the next update measures the weights again
            return False
        self._saved = False  # nothing to restore: this step is taken without copies
        self.bound = grown
        return True

    def save(self, params: list[nn.Parameter]) -> None:
        """Copy the weights ``params`` and the optimizer's state (one fused copy into buffers kept
        between steps; the buffers are made again when the state's tensors change)."""
        state = self.optimizer.state
        entries: dict[Any, dict] = {}
        tensors = list(params)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                entry = state.get(p)
                if entry:
                    entries[p] = dict(entry)
                    tensors.extend(v for v in entry.values() if isinstance(v, torch.Tensor))
        self._entries = entries
        self._saved = True
        with torch.no_grad():
            if len(tensors) == len(self._tensors) and all(a is b for a, b in zip(tensors, self._tensors)):
                torch._foreach_copy_(self._copies, tensors)
            else:
                self._tensors, self._copies = tensors, [t.detach().clone() for t in tensors]

    def restore(self) -> None:
        """Put back the weights and the optimizer's state copied by the last ``save`` (nothing after
        a step taken without copies)."""
        if not self._saved:
            return
        state = self.optimizer.state
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p in self._entries:
                    state[p] = dict(self._entries[p])
                elif p in state:
                    del state[p]
        with torch.no_grad():
            torch._foreach_copy_(self._tensors, self._copies)
        self._saved = False  # restored once: the copies are of no later step


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all tensors together (0 if there are none), without a host sync."""
    if not tensors:
        return torch.zeros(())
    with torch.no_grad():
        if _uniform(tensors):  # one dtype and device, the usual case: one fused pass, no grouping
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))
        if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: one fused (foreach) pass
            return torch.nn.utils.get_total_norm(tensors, 2.0)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


def _uniform(tensors: list[torch.Tensor]) -> bool:
    """Whether the tensors share one floating dtype and one device (what a fused norm needs)."""
    first = tensors[0]
    return first.is_floating_point() and all(t.dtype == first.dtype and t.device == first.device for t in tensors)


def sgd_rate(optimizer: Any) -> Optional[float]:
    """The largest learning rate of a ``torch.optim.SGD`` without momentum or weight decay (whose
    step moves each weight by exactly lr times its gradient), or None for any other optimizer."""
    if type(optimizer) is not torch.optim.SGD:
        return None
    rates = []
    for group in optimizer.param_groups:
        if group.get("momentum", 0) != 0 or group.get("weight_decay", 0) != 0:
            return None
        rates.append(abs(float(group["lr"])))
    return max(rates, default=0.0)


def sgd_step_bound(weights_norm: float, rate: float, step_norm: float, margin: float = 1e-3) -> float:
    """A bound on the largest weight after an SGD step: no element exceeds the weights' 2-norm
    before it plus ``rate`` times the gradient's 2-norm (each element is at most the 2-norm of its
    tensor), with a relative ``margin`` for the rounding of both norms and of the step."""
    return (weights_norm + rate * step_norm) * (1 + margin)


def all_finite(params: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (the exact test; one host sync)."""
    with torch.no_grad():
        return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True


_KNOWN_STATE = {"SGD": (), "Adam": ("step", "exp_avg", "exp_avg_sq"), "AdamW": ("step", "exp_avg", "exp_avg_sq"),
                "Adamax": ("step", "exp_avg", "exp_inf"), "NAdam": ("step", "mu_product", "exp_avg", "exp_avg_sq"),
                "RAdam": ("step", "exp_avg", "exp_avg_sq"), "RMSprop": ("step", "square_avg"),
                "Adagrad": ("step", "sum"), "Adadelta": ("step", "square_avg", "acc_delta"),
                "Rprop": ("step", "prev", "step_size"), "ASGD": ("step", "eta", "mu", "ax")}
"""torch.optim's optimizers whose per-parameter state is tensors only, scalars or of their parameter's
shape, and the entries each initialised state holds (at least)."""


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """Raise a ``CheckpointError`` naming the field unless ``saved`` is a state of ``optimizer``: its
    groups and parameters, finite state tensors of their parameters' shapes."""
    f = Fields(saved, "optimizer")
    groups, states = f.list("param_groups"), f.dict("state")
    mine = optimizer.param_groups
    if len(groups) != len(mine):
        raise CheckpointError(f"checkpoint field optimizer.param_groups holds {len(groups)} groups; this optimizer "
                              f"has {len(mine)}")
    params: dict[int, torch.Tensor] = {}
    for i, (group, own) in enumerate(zip(groups, mine)):
        g = Fields(group, f"optimizer.param_groups[{i}]")
        for key, value in own.items():
            if key not in ("params", "param_names"):
                like(g.raw(key), value, g.path(key))
        ids = g.list("params")
        if len(ids) != len(own["params"]):
            raise CheckpointError(f"checkpoint field {g.path('params')} holds {len(ids)} parameters; this "
                                  f"optimizer's group {i} has {len(own['params'])}")
        for j, (k, p) in enumerate(zip(ids, own["params"])):
            params[integer(k, f"{g.path('params')}[{j}]")] = p
    bad = _out_of_range(groups, mine)
    if bad is not None:
        index, key, value, expected = bad
        raise CheckpointError(f"checkpoint field optimizer.param_groups[{index}].{key} must be {expected}; got {value!r}")
    for key, entry in states.items():
        if key not in params:
            raise CheckpointError(f"checkpoint field optimizer.state holds parameter {key!r}, which no group lists")
        _check_entry(type(optimizer).__name__, Fields(entry, f"optimizer.state[{key}]"), params[key])


def _check_entry(kind: str, entry: Fields, param: torch.Tensor) -> None:
    """One parameter's saved optimizer state: finite tensors (for torch.optim's own optimizers: tensors
    only, of the entries they hold, scalars or of the parameter's shape), a step count >= 0."""
    known = _KNOWN_STATE.get(kind)
    if known is not None and entry.saved:
        missing = [k for k in known if k not in entry.saved]
        if missing:
            raise CheckpointError(f"checkpoint field {entry.where} lacks {missing}, which {kind} keeps per parameter")
    for name, value in entry.saved.items():
        where = f"{entry.where}[{name!r}]"
        if known is not None and not isinstance(value, torch.Tensor):
            raise bad(where, f"a tensor ({kind} keeps its state in tensors)", value)
        if isinstance(value, torch.Tensor):
            if value.dim() > 0 and tuple(value.shape) != tuple(param.shape) and (
                    known is not None or value.numel() == param.numel()):
                raise CheckpointError(f"checkpoint field {where} has shape {tuple(value.shape)}; its parameter has "
                                      f"{tuple(param.shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"checkpoint field {where} holds non-finite values")
        if name == "step" and any(v < 0 or not math.isfinite(v) for v in _numbers(value)):
            raise bad(where, "a step count >= 0", value)


def load_optimizer(optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """``optimizer.load_state_dict(saved)`` of a state ``check_optimizer_state`` passed."""
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint field optimizer does not fit this optimizer: {exc!r}") from exc
