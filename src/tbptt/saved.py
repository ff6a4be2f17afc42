"""Saved data read back field by field: every value is checked for its kind and range, and a bad
one is a ``CheckpointError`` naming the field by its path (``engine.segments[2].stop``).

A checkpoint is plain data (dicts, lists, numbers, strings, tensors) that a disk, a copy or a hand
may have changed. Nothing here knows what the fields mean; the readers of each part (the streams,
the history, the fit loop) say which fields they need and what each must be.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not belong to this model and schedule."""


def _shown(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def bad(where: str, expected: str, value: Any) -> CheckpointError:
    """The error for field ``where`` holding ``value`` where ``expected`` was needed."""
    return CheckpointError(f"checkpoint field {where} must be {expected}; got {_shown(value)}")


class Fields:
    """The fields of one saved dict, read with checks; ``where`` is the dict's own path."""

    def __init__(self, saved: Any, where: str) -> None:
        if not isinstance(saved, Mapping):
            raise bad(where, "a dict", saved)
        self.saved, self.where = saved, where

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def raw(self, key: str) -> Any:
        if key not in self.saved:
            raise CheckpointError(f"checkpoint field {self.path(key)} is missing")
        return self.saved[key]

    def int(self, key: str, low: Optional[int] = 0, high: Optional[int] = None, none: bool = False) -> Any:
        return integer(self.raw(key), self.path(key), low, high, none)

    def number(self, key: str, low: Optional[float] = None, finite: bool = False) -> float:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(self.path(key), "a number", value)
        if (finite and not math.isfinite(value)) or math.isnan(value) or (low is not None and value < low):
            raise bad(self.path(key), "a " + ("finite " if finite else "") + "number"
                      + (f" >= {low}" if low is not None else ""), value)
        return float(value)

    def str(self, key: str, choices: Optional[Iterable[str]] = None, none: bool = False) -> Any:
        value = self.raw(key)
        if value is None and none:
            return None
        options = None if choices is None else tuple(choices)
        if not isinstance(value, str) or (options is not None and value not in options):
            raise bad(self.path(key), "a string" if options is None else f"one of {options}", value)
        return value

    def bool(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise bad(self.path(key), "True or False", value)
        return value

    def list(self, key: str) -> list:
        value = self.raw(key)
        if not isinstance(value, (list, tuple)):
            raise bad(self.path(key), "a list", value)
        return list(value)

    def dict(self, key: str, none: bool = False) -> Any:
        value = self.raw(key)
        if value is None and none:
            return None
        if not isinstance(value, Mapping):
            raise bad(self.path(key), "a dict", value)
        return dict(value)

    def tensor(self, key: str, dtype: Optional[torch.dtype] = None, none: bool = False) -> Any:
        return tensor(self.raw(key), self.path(key), dtype, none)


def integer(value: Any, where: str, low: Optional[int] = 0, high: Optional[int] = None, none: bool = False) -> Any:
    """``value`` if it is an int in ``[low, high]`` (None passes with ``none``)."""
    if value is None and none:
        return None
    in_range = (low is None or value >= low) and (high is None or value <= high) if isinstance(value, int) else False
    if isinstance(value, bool) or not in_range:
        bounds = " and ".join(b for b in (f">= {low}" if low is not None else "",
                                          f"<= {high}" if high is not None else "") if b)
        raise bad(where, "an int" + (f" {bounds}" if bounds else "") + (" or None" if none else ""), value)
    return value


def tensor(value: Any, where: str, dtype: Optional[torch.dtype] = None, none: bool = False) -> Any:
    """``value`` if it is a tensor (of ``dtype``, when given)."""
    if value is None and none:
        return None
    if not isinstance(value, torch.Tensor) or (dtype is not None and value.dtype != dtype):
        raise bad(where, f"a {dtype} tensor" if dtype is not None else "a tensor", value)
    return value


def tensor_dict(value: Any, where: str, finite: bool = False) -> dict[str, torch.Tensor]:
    """``value`` if it is a dict of names to tensors (finite ones, with ``finite``)."""
    if not isinstance(value, Mapping):
        raise bad(where, "a dict of names to tensors", value)
    for name, t in value.items():
        if not isinstance(name, str):
            raise bad(f"{where} key", "a string", name)
        tensor(t, f"{where}[{name!r}]")
        if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"checkpoint field {where}[{name!r}] holds non-finite values; tbptt never saves "
                                  "them, so the file was changed after it was written")
    return dict(value)


def like(value: Any, model: Any, where: str) -> Any:
    """``value`` if it is of the kind of ``model`` (the value the reader has now): a bool for a bool,
    a number for a number (finite when the model is), a string for a string, a list or tuple of as
    many items each of its kind, None or a bool where the model is None (an option left to its
    default); other kinds pass."""
    if isinstance(model, bool) or model is None:
        if not (isinstance(value, bool) or (model is None and value is None)):
            raise bad(where, "True or False" + (" or None" if model is None else ""), value)
    elif isinstance(model, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or (
                math.isfinite(model) and not math.isfinite(value)):
            raise bad(where, "a " + ("finite " if math.isfinite(model) else "") + "number", value)
    elif isinstance(model, str):
        if not isinstance(value, str):
            raise bad(where, "a string", value)
    elif isinstance(model, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(model):
            raise bad(where, f"a list of {len(model)} items", value)
        for i, (v, m) in enumerate(zip(value, model)):
            like(v, m, f"{where}[{i}]")
    return value


def nesting(value: Any, where: str) -> Any:
    """``value`` if it is a recurrent state: None, a tensor, a number or any nesting of tuples, lists
    and dicts of them."""
    return _nested(value, where, (torch.Tensor, bool, int, float), "a state (tensors in tuples, lists or dicts)")


def plain(value: Any, where: str) -> Any:
    """``value`` if it is plain data: None, a bool, number or string, or lists and dicts of them (a
    tensor in its place would make comparisons raise)."""
    return _nested(value, where, (bool, int, float, str), "plain data (numbers, strings, lists, dicts)")


def _nested(value: Any, where: str, leaves: tuple[type, ...], expected: str) -> Any:
    """``value`` if it is None, one of ``leaves`` or any nesting of tuples, lists and dicts of them."""
    if value is None or isinstance(value, leaves):
        return value
    if isinstance(value, Mapping):
        for k, v in value.items():
            _nested(v, f"{where}[{k!r}]", leaves, expected)
        return value
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _nested(v, f"{where}[{i}]", leaves, expected)
        return value
    raise bad(where, expected, value)
