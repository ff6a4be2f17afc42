"""Every schedule the engine follows, and the one reader of their names.

``TBPTT(k1, k2)`` (``schedule.py``), ``ARTBP(k1, mean_k2)`` (``artbp.py``) and
``AdaptiveTBPTT(k1, tolerance, ...)`` (``adaptive.py``). ``parse_schedule`` reads what a user writes
on the command line or in a configuration (``"10,40"``, ``"artbp:10,30"``, ``"adaptive:10"``) and
what ``str()`` writes (``"TBPTT(10,40)"``, ``"ARTBP(10,30)"``, ``"AdaptiveTBPTT(10,tolerance=0.05)"``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Union

from .adaptive import AdaptiveTBPTT
from .artbp import ARTBP
from .schedule import TBPTT

Schedule = Union[TBPTT, ARTBP, AdaptiveTBPTT]
SCHEDULES = (TBPTT, ARTBP, AdaptiveTBPTT)
SCHEDULE_OPTIONS = tuple(AdaptiveTBPTT.OPTIONS)
"""Keys a configuration's ``@key=value`` part may give the schedule (the adaptive one's)."""

_EXAMPLES = "'5,20', 'n,n', 'artbp:10,30' or 'adaptive:10@tolerance=0.05'"


def is_schedule(value: object) -> bool:
    return isinstance(value, SCHEDULES)


def check_schedule(value: object) -> Schedule:
    """``value`` if it is a schedule, else a TypeError that lists them."""
    if not is_schedule(value):
        raise TypeError(f"schedule must be a tbptt.TBPTT, tbptt.ARTBP or tbptt.AdaptiveTBPTT; got {type(value).__name__}")
    return value  # type: ignore[return-value]


def reaches_earlier_blocks(schedule: Schedule) -> bool:
    """Whether a window of ``schedule`` can begin before its block (stored activations then matter)."""
    if isinstance(schedule, (ARTBP, AdaptiveTBPTT)):
        return True
    return schedule.k1 is not None and (schedule.k2 is None or schedule.k2 > schedule.k1)


def window_kind(schedule: Schedule) -> str:
    """How a schedule's windows are given: ``"fixed"`` (TBPTT), ``"random"`` (ARTBP: drawn per update,
    any lag reached with some probability) or ``"adaptive"`` (AdaptiveTBPTT: chosen as it trains)."""
    return "random" if isinstance(schedule, ARTBP) else "adaptive" if isinstance(schedule, AdaptiveTBPTT) else "fixed"


def nominal_k2(schedule: Schedule) -> Optional[int]:
    """One window to name a schedule by where a number is wanted (None: n): TBPTT's k2, ARTBP's mean
    window rounded, AdaptiveTBPTT's max_k2 (the k2 it chooses is only known once it trained)."""
    if isinstance(schedule, AdaptiveTBPTT):
        return schedule.max_k2
    if isinstance(schedule, ARTBP):
        return round(schedule.mean_k2)
    return schedule.k2


def longest_window(schedule: Schedule) -> Optional[int]:
    """The longest window ``schedule`` backpropagates through (None: the whole stream so far):
    TBPTT's k2; AdaptiveTBPTT's max_k2 (its measurements' window too); for ARTBP, whose J is
    unbounded, the window that one update in a million exceeds, ``k1 + ceil(log(1e-6) / log(q))``."""
    if isinstance(schedule, AdaptiveTBPTT):
        return schedule.max_k2
    if isinstance(schedule, ARTBP):
        q = schedule.q
        return schedule.k1 + (0 if q == 0 else math.ceil(math.log(1e-6) / math.log(q)))
    return schedule.k2


def _split(body: str, prefix: str) -> Optional[str]:
    """The arguments of ``prefix:ARGS`` or ``Name(ARGS)`` (case-insensitive), else None."""
    lower = body.lower()
    if lower.startswith(prefix + ":"):
        return body[len(prefix) + 1:]
    for name in (prefix + "(", prefix + "tbptt("):
        if lower.startswith(name) and body.endswith(")"):
            return body[len(name):-1]
    return None


def _read(key: str, value: Any, kind: type, text: str) -> Any:
    if not isinstance(value, str):
        return value
    if kind is int and value.lower() == "none":
        return None
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"bad value for {key} in configuration {text!r}: {value!r} (expected {kind.__name__})") from None


def _adaptive(args: str, options: dict[str, Any], text: str) -> AdaptiveTBPTT:
    parts = [p.strip() for p in args.split(",") if p.strip()]
    positional = [p for p in parts if "=" not in p]
    for item in parts:
        if "=" in item:
            key, _, value = item.partition("=")
            options.setdefault(key.strip(), value.strip())
    if len(positional) != 1 or not positional[0].isdigit():
        raise ValueError(f"expected adaptive:K1 (K1 a positive int), e.g. 'adaptive:10'; got {text!r}")
    unknown = sorted(set(options) - set(AdaptiveTBPTT.OPTIONS))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} in configuration {text!r}; AdaptiveTBPTT takes "
                         f"{', '.join(AdaptiveTBPTT.OPTIONS)}")
    read = {k: _read(k, v, AdaptiveTBPTT.OPTIONS[k], text) for k, v in options.items()}
    return AdaptiveTBPTT(int(positional[0]), **read)


def _artbp(args: str, text: str) -> ARTBP:
    parts = [p.strip() for p in args.split(",")]
    try:
        k1, mean = int(parts[0]), float(parts[1])
        if len(parts) != 2:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"expected artbp:K1,MEAN_K2 (K1 a positive int, MEAN_K2 >= K1), e.g. 'artbp:10,30'; "
                         f"got {text!r}") from None
    return ARTBP(k1, mean)


def parse_schedule(text: str, options: Optional[Mapping[str, Any]] = None) -> Schedule:
    """Read a schedule: ``"K1,K2"`` or ``"TBPTT(K1,K2)"`` (``n`` for the whole stream),
    ``"artbp:K1,MEAN_K2"`` or ``"ARTBP(K1,MEAN_K2)"``, ``"adaptive:K1"`` or
    ``"AdaptiveTBPTT(K1[,key=value,...])"``. ``options`` (e.g. a configuration's
    ``@tolerance=0.05``) go to the adaptive schedule: tolerance, min_k2, max_k2, every."""
    if not isinstance(text, str):
        raise TypeError(f"a schedule must be a string like {_EXAMPLES}; got {text!r}")
    body = text.strip()
    given = dict(options or {})
    adaptive = _split(body, "adaptive")
    if adaptive is not None:
        return _adaptive(adaptive, given, text)
    if given:
        raise ValueError(f"{', '.join(sorted(given))} in {text!r} belong to an adaptive schedule "
                         "(adaptive:K1@tolerance=...); this one takes none")
    artbp = _split(body, "artbp")
    if artbp is not None:
        return _artbp(artbp, text)
    try:
        return TBPTT.parse(body)
    except ValueError as exc:
        if not str(exc).startswith("expected"):  # a value TBPTT refused (k1=0, say): its own message
            raise
        raise ValueError(f"expected a configuration like {_EXAMPLES}; got {text!r}") from None
