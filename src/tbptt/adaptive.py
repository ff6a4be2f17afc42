"""AdaptiveTBPTT(k1, tolerance): TBPTT(k1, k2) with k2 chosen during training from the measured decay
of backpropagated state gradients (after Aicher, Foti & Fox 2019, "Adaptively truncating
backpropagation through time to control gradient bias").

Every ``every`` updates the engine measures, for the update at hand, ``a_j``: the norm of the
gradient of the block's loss with respect to the state ``j`` steps before the block, for ``j`` up to
``max_k2 - k1`` (a window of ``max_k2`` steps, run again at the current weights, the state kept every
``stride`` steps). A window that begins ``J = k2 - k1`` steps before the block drops the terms of the
weights' use before it, which reach the loss through the states ``J, J+1, ...`` steps back; each is
at most ``a_j`` times the size of one step's weight Jacobian, so (for Jacobians of similar size) the
dropped share of the gradient is at most ``sum_{j >= J} a_j / sum_{j >= 0} a_j`` (the block's own
steps only add to what is kept). The new k2 is the smallest whose share is at most ``tolerance``,
within ``[min_k2, max_k2]``. Between measured lags ``a_j`` is interpolated geometrically; beyond the
last, the decay rate fitted to the last measured lags extends it (``max_k2`` when it does not decay).
When ``a_j = C beta**j`` (the geometric decay Aicher et al. assume) the share is ``beta**J`` and the
rule is theirs; when the decay is not geometric (a state that carries a signal for a while and then
forgets it fast) the measured curve, not one rate fitted to all of it, says where the mass lies.

A window can only begin where the state was kept when that step first ran; so a k2 chosen after
the update at T is in force from the first update whose window under it begins at or after T (the
update at ``T + k2``, rounded up to a block end); until then the earlier choice holds. At the start of
a new stream the latest choice holds at once. Pure Python, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .decay import geometric_rate
from .schedule import TBPTT, Update
from .validate import InvalidArgument, fraction, positive_int

_POINTS = 8  # lags measured per measurement, at most (plus the block's start): one model call each


@dataclass(frozen=True)
class AdaptiveTBPTT:
    """TBPTT(k1, k2) whose k2 is the smallest window with an estimated relative gradient bias of at
    most ``tolerance``, re-chosen every ``every`` updates from the measured decay of the state
    gradient over lags up to ``max_k2``, and kept within ``[min_k2, max_k2]`` (``min_k2`` None: k1,
    also the k2 before the first measurement). Aicher, Foti & Fox (2019).

    >>> s = AdaptiveTBPTT(10, tolerance=0.05, max_k2=42)   # lags measured 4 steps apart
    >>> str(s), s.choose([0.9 ** j for j in range(0, 33, 4)])   # a decay of 0.9 per step
    ('AdaptiveTBPTT(10,tolerance=0.05,max_k2=42)', 39)
    """

    k1: int
    tolerance: float = 0.1
    min_k2: Optional[int] = None
    max_k2: int = 200
    every: int = 100

    OPTIONS = {"tolerance": float, "min_k2": int, "max_k2": int, "every": int}

    def __post_init__(self) -> None:
        object.__setattr__(self, "k1", positive_int(self.k1, "k1", "steps between updates"))
        object.__setattr__(self, "tolerance", fraction(self.tolerance, "tolerance", "the relative bias allowed"))
        lowest = positive_int(self.min_k2, "min_k2", "the shortest window", "k1")
        object.__setattr__(self, "min_k2", lowest)
        top = positive_int(self.max_k2, "max_k2", "the longest window, and the lags measured")
        object.__setattr__(self, "max_k2", top)
        if top <= self.k1:
            raise InvalidArgument("max_k2", self.max_k2, f"an int > k1 = {self.k1}", "no lag before the block is measured")
        if self.lowest > top:
            raise InvalidArgument("min_k2", self.min_k2, f"at most max_k2 = {top}")
        object.__setattr__(self, "every", positive_int(self.every, "every", "updates between measurements"))

    @property
    def errors(self) -> str:
        return "new"

    @property
    def lowest(self) -> int:
        """The shortest window allowed, and the first in force."""
        return self.k1 if self.min_k2 is None else self.min_k2

    @property
    def stride(self) -> int:
        """Steps between the lags measured (about ``_POINTS`` lags over ``max_k2 - k1``)."""
        return max(1, math.ceil((self.max_k2 - self.k1) / _POINTS))

    @property
    def history(self) -> int:
        """Steps before the block the first measurement of a run needs (four lags measured at least,
        or all of them); later ones wait for as many as the longest stream so far had."""
        return min(self.max_k2 - self.k1, 3 * self.stride)

    def dropped_share(self, norms: Sequence[float], begins: int) -> float:
        """The share of the gradient's mass that a window beginning ``begins`` steps before the block
        drops, estimated from ``norms[i]`` (the state gradient's norm ``i * stride`` steps back)."""
        values, tail, rate = _profile(norms, self.stride)
        total = sum(values) + tail
        if not math.isfinite(total):
            return 1.0
        if total == 0:
            return 0.0
        if begins < len(values):
            return (sum(values[begins:]) + tail) / total
        return tail * rate ** (begins - len(values)) / total

    def choose(self, norms: Sequence[float]) -> int:
        """The smallest k2 whose window drops at most ``tolerance`` of the gradient's mass, within
        ``[lowest, max_k2]`` (see the module's docstring)."""
        for begins in range(1, self.max_k2 - self.k1 + 1):
            if self.dropped_share(norms, begins) <= self.tolerance:
                return min(self.max_k2, max(self.lowest, self.k1 + begins))
        return self.max_k2

    def __str__(self) -> str:
        defaults = AdaptiveTBPTT(self.k1)
        extras = [f"{key}={getattr(self, key):g}" for key in self.OPTIONS
                  if getattr(self, key) != getattr(defaults, key)]
        return "AdaptiveTBPTT(" + ",".join([str(self.k1)] + extras) + ")"

    def block_end(self, previous: int) -> int:
        return previous + self.k1

    def cost(self, n: int) -> dict[str, int]:
        """The most a stream of ``n`` steps can cost: TBPTT(k1, max_k2)'s (measurements aside)."""
        return TBPTT(self.k1, self.max_k2).cost(n)

    def plan(self, uniform: Optional[Callable[[], float]] = None) -> "AdaptivePlan":
        return AdaptivePlan(self)


class AdaptivePlan:
    """The choices of k2 so far and when each is in force; when the next measurement falls."""

    def __init__(self, schedule: AdaptiveTBPTT) -> None:
        self.schedule = schedule
        # (in force from, chosen at, k2): the choice made latest among those in force holds
        self.choices: list[tuple[int, int, int]] = [(0, -1, schedule.lowest)]
        self.count = 0  # updates made, over every stream
        self.due = 0  # the update count from which the next measurement is due
        self.seen = 0  # the longest stream that ended so far, in steps
        self.measurements: list[dict] = []

    def reset(self, ended_at: int = 0) -> None:
        """A stream ended after ``ended_at`` steps: the latest choice holds at once in the next."""
        self.choices = [(0, -1, self.k2_at(math.inf))]
        self.seen = max(self.seen, ended_at)

    def k2_at(self, position: float) -> int:
        """The k2 in force for the update at ``position``."""
        return max((c for c in self.choices if c[0] <= position), key=lambda c: c[1])[2]

    # ------------------------------------------------------------------------------------------
    def block_end(self, previous: int) -> int:
        return previous + self.schedule.k1

    def update(self, previous: int, stop: Optional[int] = None) -> Optional[Update]:
        return TBPTT(self.schedule.k1, self.k2_at(previous + self.schedule.k1)).update(previous, stop)

    def _start(self, end: int) -> int:
        return max(0, end - self.k2_at(end))

    def starts_in(self, previous: int, end: int) -> list[int]:
        k = self.schedule.k1
        ends = range(previous + k, end + self.schedule.max_k2 + 1, k)
        found = {self._start(t) for t in ends}
        # every measurement to come, if the stream goes on: from the next, one each `every` updates
        step = self.schedule.every * k
        for block in range(self.measuring_block(previous), end + self.schedule.max_k2, step):
            found.add(self.measurement_start(block))
        return sorted(p for p in found if previous < p < end)

    def reach(self, previous: int) -> int:
        k = self.schedule.k1
        ends = range(previous + k, previous + self.schedule.max_k2 + k + 1, k)
        measured = self.measurement_start(self.measuring_block(previous))
        return min([self._start(t) for t in ends] + [measured, previous])

    def window_length(self, update: Update) -> int:
        return self.k2_at(update.loss_start + self.schedule.k1)

    def closed(self, update: Update) -> None:
        self.count += 1

    # ------------------------------------------------------------------------------------------
    def measuring_block(self, previous: int) -> int:
        """The start of the block, from ``previous`` on, whose update is measured next (if the
        stream goes on): the first with the measurement due and enough steps before it, which is all
        ``max_k2 - k1`` lags or, when streams are shorter, as many as the longest so far allowed
        (until a stream has ended: ``history``)."""
        k, lags = self.schedule.k1, self.schedule.max_k2 - self.schedule.k1
        due = previous + max(0, self.due - self.count) * k
        needed = min(lags, (self.seen - 1) // k * k) if self.seen else self.schedule.history
        return max(due, math.ceil(needed / k) * k)

    def measurement_start(self, block: int) -> int:
        """Where the measurement of the update closing ``block`` begins: ``max_k2`` steps before it ends."""
        return max(0, block + self.schedule.k1 - self.schedule.max_k2)

    def measures(self, update: Update) -> Optional[int]:
        """The start of the measurement window if ``update`` is measured, else None."""
        if update.loss_start != self.measuring_block(update.loss_start):
            return None
        return self.measurement_start(update.loss_start)

    def observe(self, norms: Optional[list[float]], update: Update) -> Optional[int]:
        """Take the measurement of ``update`` (``norms[i]``: the state gradient's norm ``i * stride``
        steps before the block; None or fewer than two: nothing measured) and choose k2 from it;
        the choice is returned. The next measurement is due ``every`` updates later either way."""
        self.due = self.count + self.schedule.every
        if norms is None or len(norms) < 2:
            return None
        k2 = self.schedule.choose(norms)
        growth = _profile(norms, self.schedule.stride)[2]
        position = update.stop
        self.choices = [c for c in self.choices if c[1] >= self._holding(position)]
        self.choices.append((position + k2, position, k2))
        self.measurements.append({"update": self.count, "position": position, "growth": growth, "k2": k2})
        return k2

    def _holding(self, position: int) -> int:
        """When the choice in force at ``position`` was made (older ones can no longer hold)."""
        return max((c for c in self.choices if c[0] <= position), key=lambda c: c[1])[1]

    def state_dict(self) -> dict:
        return {"choices": [list(c) for c in self.choices], "count": self.count, "due": self.due,
                "seen": self.seen, "measurements": [dict(m) for m in self.measurements]}

    def load_state_dict(self, saved: dict) -> None:
        self.choices = [tuple(int(v) for v in c) for c in saved["choices"]]  # type: ignore[misc]
        self.count, self.due, self.seen = int(saved["count"]), int(saved["due"]), int(saved["seen"])
        self.measurements = [dict(m) for m in saved["measurements"]]


def _profile(norms: Sequence[float], stride: int) -> tuple[list[float], float, float]:
    """The state gradient's norm at every step back from the block, from its values ``stride`` steps
    apart (geometric between them), the sum of its extension beyond the last (infinite if it does
    not decay), and the decay rate per step of that extension (fitted to the last four values)."""
    values: list[float] = []
    for a, b in zip(norms[:-1], norms[1:]):
        for r in range(stride):
            f = r / stride
            values.append(a ** (1 - f) * b**f if a > 0 and b > 0 else a * (1 - f) + b * f)
    values.append(float(norms[-1]))
    rate = geometric_rate(norms[-4:]) ** (1 / stride)
    tail = 0.0 if norms[-1] == 0 else (math.inf if rate >= 1 else norms[-1] * rate / (1 - rate))
    return values, tail, rate
