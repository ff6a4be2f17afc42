"""Checks of argument values, with errors that name the value as the user wrote it.

Pure Python, no torch: every layer may use them. Each raises an ``InvalidArgument`` (a
``ValueError``, or a ``TypeError`` subclass for a value of the wrong kind) that carries the
argument's name, so the command line can say ``--segment-length`` where Python says
``segment_length`` (``InvalidArgument.renamed``).
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any, Iterable, Mapping, Optional, Sequence


class InvalidArgument(ValueError):
    """A bad argument value: ``name`` (as passed), the ``value`` and what was ``expected``.

    The message reads ``"{name} must be {expected}; got {value!r}"`` plus an optional hint.
    ``mentions``: other arguments' names that the expectation or the hint speaks of (``"given
    together with checkpoint"``), renamed with it (``renamed``).
    """

    def __init__(self, name: str, value: Any, expected: str, hint: str = "", mentions: Sequence[str] = ()) -> None:
        self.name, self.value, self.expected, self.hint = name, value, expected, hint
        self.mentions = tuple(mentions)
        super().__init__(self._message(name))

    def _message(self, name: str) -> str:
        hint = f"; {self.hint}" if self.hint else ""
        return f"{name} must be {self.expected}; got {self.value!r}{hint}"

    def renamed(self, name: str, others: Optional[Mapping[str, str]] = None) -> "InvalidArgument":
        """The same error under another name for the argument (a command-line flag, say), and under
        ``others[m]`` for each argument ``m`` it mentions."""
        others = {m: others[m] for m in self.mentions if others and m in others}

        def rename(text: str) -> str:
            for old, new in others.items():
                text = re.sub(rf"(?<![\w-]){re.escape(old)}(?!\w)", new, text)
            return text

        error = type(self)(name, self.value, rename(self.expected), rename(self.hint),
                           [others.get(m, m) for m in self.mentions])
        error.__cause__ = self
        return error


class InvalidArgumentType(InvalidArgument, TypeError):
    """An argument of the wrong kind (a string where a number belongs)."""


def as_int(value: object) -> Optional[int]:
    """``value`` as an int if it is an integer of any kind (numpy's included, bool excluded), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def positive_int(value: object, name: str, what: str = "", none: str = "") -> Optional[int]:
    """``value`` as a positive int; None passes (returned as None) when ``none`` says what it means.

    ``what`` describes the unit (``"steps per call"``); the error reads, for instance,
    ``segment_length must be a positive int (steps per call) or None (the whole split); got 0``.
    """
    expected = "a positive int" + (f" ({what})" if what else "") + (f" or None ({none})" if none else "")
    if value is None and none:
        return None
    number = as_int(value)
    if number is None:
        raise InvalidArgumentType(name, value, expected)
    if number < 1:
        raise InvalidArgument(name, value, expected)
    return number


def positive_ints(**values: object) -> None:
    """``positive_int`` of each keyword's value, named by the keyword."""
    for name, value in values.items():
        positive_int(value, name)


def non_negative_int(value: object, name: str, what: str = "") -> int:
    """``value`` as an int >= 0."""
    expected = "a non-negative int" + (f" ({what})" if what else "")
    number = as_int(value)
    if number is None:
        raise InvalidArgumentType(name, value, expected)
    if number < 0:
        raise InvalidArgument(name, value, expected)
    return number


def _number(value: object, name: str, expected: str) -> float:
    # a bool or a string is a value of another kind, even where float() would read it
    if isinstance(value, (bool, str, bytes)):
        raise InvalidArgumentType(name, value, expected)
    try:
        return float(value)  # type: ignore[arg-type]  # ints, floats, numpy scalars, 0-d tensors
    except (TypeError, ValueError):
        raise InvalidArgumentType(name, value, expected) from None


def positive_number(value: object, name: str, what: str = "", none: str = "") -> Optional[float]:
    """``value`` as a finite number > 0 (as a float); None passes when ``none`` says what it means."""
    expected = "a positive number" + (f" ({what})" if what else "") + (f" or None ({none})" if none else "")
    if value is None and none:
        return None
    number = _number(value, name, expected)
    if not (math.isfinite(number) and number > 0):
        raise InvalidArgument(name, value, expected)
    return number


def non_negative_number(value: object, name: str, what: str = "", none: str = "") -> Optional[float]:
    """``value`` as a finite number >= 0 (as a float); None passes when ``none`` says what it means."""
    expected = "a number >= 0" + (f" ({what})" if what else "") + (f" or None ({none})" if none else "")
    if value is None and none:
        return None
    number = _number(value, name, expected)
    if not (math.isfinite(number) and number >= 0):
        raise InvalidArgument(name, value, expected)
    return number


def fraction(value: object, name: str, what: str = "") -> float:
    """``value`` as a number strictly between 0 and 1."""
    expected = "a number in (0, 1)" + (f", {what}" if what else "")
    number = _number(value, name, expected)
    if not 0 < number < 1:
        raise InvalidArgument(name, value, expected)
    return number


def one_of(value: object, name: str, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise InvalidArgument(name, value, "one of " + ", ".join(repr(c) for c in options))
    return value
