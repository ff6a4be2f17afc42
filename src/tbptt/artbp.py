"""ARTBP(k1, mean_k2): truncation at random lengths, compensated so that the gradient is unbiased.

After Tallec & Ollivier (2017), "Unbiasing truncated backpropagation through time". Updates fall
every k1 steps and inject the block's new errors, as TBPTT(k1, ., errors="new"). The update closing
the block ``[P, P + k1)`` backpropagates through a window of ``L = k1 + J`` steps, ``[P - J, P + k1)``
(clipped at the stream's start), with ``J`` drawn afresh for every update from ``P(J >= j) = q**j``
and ``q = (mean_k2 - k1) / (mean_k2 - k1 + 1)``, so that ``E[L] = mean_k2``. The gradient through
the use of the weights at step ``P - j`` (j steps before the block) is multiplied by
``1 / P(J >= j) = q**-j``: each such term then enters with expectation one, and the update is an
unbiased estimate of TBPTT(k1, n)'s gradient for that update (at fixed weights).

Pure Python, no torch: uniforms come from the caller (the engine owns a ``torch.Generator``).

Which steps a window can reach must be known when those steps first run (their state is kept then,
and only then). Drawing each J when its update comes would be too late, and drawing it ahead is
impossible with J unbounded; so the draws are made block by block, in stream order: when the block
``[P, P + k1)`` is about to run, the plan draws which later updates' windows begin inside it. For an
update whose window was not placed in an earlier block, that is an event of known conditional
probability, the same for every update at the same distance ahead; over the infinitely many updates
ahead, the products of these probabilities telescope, so one uniform decides the farthest update
placed here and a finite number of others decide the rest. The result has exactly the law of one
independent J per update (``tests/test_artbp.py`` checks the marginal law and the independence of
neighbours), while the engine keeps only the steps that windows already placed can reach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from .schedule import Update, updates_cost
from .validate import InvalidArgument, positive_int, positive_number

Uniform = Callable[[], float]
"""A source of independent uniform draws in (0, 1]."""
_NEGLIGIBLE = 1e-18  # a probability below this no double-precision uniform can tell from zero


@dataclass(frozen=True)
class ARTBP:
    """Anticipated reweighted truncated backpropagation (Tallec & Ollivier 2017), ARTBP(k1, mean_k2).

    Every ``k1`` steps an update injects the block's new errors and backpropagates through a window
    of ``L = k1 + J`` steps, ``J`` drawn afresh with ``P(J >= j) = q**j`` (``E[L] = mean_k2``); the
    gradient through the weights' use ``j`` steps before the block is multiplied by ``q**-j``. The
    estimate is unbiased for TBPTT(k1, n)'s gradient; its variance grows as ``mean_k2`` shrinks
    (see ``docs/SEMANTICS.md``). ``mean_k2 = k1`` is TBPTT(k1, k1).

    >>> s = ARTBP(10, 30)
    >>> round(s.q, 4), str(s)
    (0.9524, 'ARTBP(10,30)')
    """

    k1: int
    mean_k2: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "k1", positive_int(self.k1, "k1", "steps between updates"))
        mean = positive_number(self.mean_k2, "mean_k2", "the mean window, at least k1")
        if mean < self.k1:
            raise InvalidArgument("mean_k2", self.mean_k2, f"a number >= k1 = {self.k1} (E[L] = k1 + E[J])")
        object.__setattr__(self, "mean_k2", int(mean) if mean == int(mean) else mean)

    @property
    def errors(self) -> str:
        return "new"

    @property
    def q(self) -> float:
        """The probability that a window reaches one step further back: ``P(J >= j) = q**j``."""
        extra = self.mean_k2 - self.k1
        return extra / (extra + 1)

    def compensation(self, j: int) -> float:
        """The factor on the gradient through the weights' use ``j`` steps before the block."""
        return 1.0 if j <= 0 else self.q ** -j

    def __str__(self) -> str:
        return f"ARTBP({self.k1},{self.mean_k2:g})"

    def block_end(self, previous: int) -> int:
        return previous + self.k1

    def plan(self, uniform: Optional[Uniform] = None) -> "ARTBPPlan":
        """The draws as the engine follows them; ``uniform`` supplies the uniforms."""
        if uniform is None:
            raise ValueError("ARTBP draws its windows: give the plan a source of uniforms")
        return ARTBPPlan(self, uniform)

    def updates(self, n: int, uniform: Uniform) -> list[Update]:
        """One draw of every update on a stream of ``n`` steps."""
        plan = self.plan(uniform)
        out: list[Update] = []
        for previous in range(0, n, self.k1):
            u = plan.update(previous, stop=min(n, previous + self.k1))
            if u is not None:
                out.append(u)
                plan.closed(u)
        return out

    def cost(self, n: int) -> dict[str, float]:
        """The expected cost of a stream of ``n`` steps: as ``TBPTT.cost``, with each window's
        expected length ``k1 + E[min(J, P)]`` (``max_window`` is the longest possible window)."""
        q, k = self.q, self.k1
        mean: list[Update] = []
        for previous in range(0, n, k):
            reach = q * (1 - q ** previous) / (1 - q) if q > 0 else 0.0
            mean.append(Update(previous - round(reach), previous, min(n, previous + k)))
        cost = updates_cost(mean, n)
        cost["max_window"] = n if q > 0 else min(n, k)  # a window may reach the stream's start
        return cost


class ARTBPPlan:
    """ARTBP's draws, block by block in stream order (see the module's docstring): for every update
    still to come whose window start is drawn, that start (clipped at the stream's start)."""

    def __init__(self, schedule: ARTBP, uniform: Uniform) -> None:
        self.schedule, self.uniform = schedule, uniform
        self.reset()

    def reset(self, ended_at: int = 0) -> None:
        self.starts: dict[int, int] = {}  # an update's block start P -> its window's start
        self.drawn = -1  # the start of the last block whose window starts were drawn

    # ------------------------------------------------------------------------------------------
    def block_end(self, previous: int) -> int:
        return previous + self.schedule.k1

    def update(self, previous: int, stop: Optional[int] = None) -> Optional[Update]:
        self._draw_through(previous)
        end = previous + self.schedule.k1
        clipped = end if stop is None else min(end, stop)
        if previous >= clipped:
            return None
        return Update(self.starts[previous], previous, clipped)

    def starts_in(self, previous: int, end: int) -> list[int]:
        self._draw_through(previous)
        return sorted({s for p, s in self.starts.items() if p > previous and previous < s < end})

    def reach(self, previous: int) -> int:
        return min([s for p, s in self.starts.items() if p >= previous] + [previous])

    def window_length(self, update: Update) -> int:
        """The L drawn, ``k1 + J``, with J clipped at the stream's start."""
        return self.schedule.k1 + update.loss_start - update.start

    def closed(self, update: Update) -> None:
        self.starts.pop(update.loss_start, None)

    def state_dict(self) -> dict:
        return {"starts": sorted(self.starts.items()), "drawn": self.drawn}

    def load_state_dict(self, saved: dict) -> None:
        self.starts = {int(p): int(s) for p, s in saved["starts"]}
        self.drawn = int(saved["drawn"])

    # ------------------------------------------------------------------------------------------
    def _draw_through(self, previous: int) -> None:
        k = self.schedule.k1
        while self.drawn < previous:
            self.drawn = 0 if self.drawn < 0 else self.drawn + k
            self._draw_block(self.drawn)

    def _draw_block(self, block: int) -> None:
        """Place, among the updates to come, those whose window begins in ``[block, block + k1)``."""
        k, q = self.schedule.k1, self.schedule.q
        self.starts.setdefault(block, block)  # not placed before: J = 0 (or the stream's first block)
        if q == 0:
            return
        placed = {(p - block) // k for p in self.starts if p > block}
        distances = self._first_block() if block == 0 else self._later_block(placed)
        for d in distances:
            self.starts[block + d * k] = max(0, block + k - 1 - self._offset(block == 0))

    def _later_block(self, placed: set[int]) -> list[int]:
        """Distances d >= 1 (in updates ahead) of the updates whose window begins in this block.

        An update d ahead not placed yet has ``J <= d*k1``; it begins here when ``J > (d-1)*k1``,
        with probability ``r_d = P((d-1)k1 < J <= d*k1) / P(J <= d*k1)``. For d beyond every placed
        update, the chance that none of them begins here telescopes to ``P(J <= (D-1)k1)``, so the
        farthest one that does is found from one uniform; those nearer are drawn one by one."""
        k, q = self.schedule.k1, self.schedule.q
        tail = 1 + max(placed, default=0)
        x = math.log(self.uniform()) / math.log(q)  # the farthest D has q**((D-1)k1 + 1) > u
        farthest = math.ceil((x - 1) / k) if (tail - 1) * k + 1 < x else None
        found = [] if farthest is None else [farthest]

        def r(d: int) -> float:
            return (q ** ((d - 1) * k + 1) - q ** (d * k + 1)) / (1 - q ** (d * k + 1))

        for d in range(1, tail if farthest is None else farthest):
            if d not in placed and self.uniform() <= r(d):
                found.append(d)
        return sorted(found)

    def _first_block(self) -> list[int]:
        """As ``_later_block`` for the stream's first block, where windows clipped at step 0 also
        begin: an update d ahead begins here when ``J > (d-1)*k1``, probability ``a_d =
        q**((d-1)k1 + 1)``; the chance that none from D on does is the product of ``1 - a_d``."""
        k, q = self.schedule.k1, self.schedule.q

        def a(d: int) -> float:
            return q ** ((d - 1) * k + 1)

        log_none = 0.0  # log of the chance that no update from d = D on begins here, D = 1 first
        d = 1
        while a(d) > _NEGLIGIBLE:
            log_none += math.log1p(-a(d))
            d += 1
        u = self.uniform()
        if u > -math.expm1(log_none):
            return []
        farthest = 1
        while True:  # the largest D with u <= P(some update from D on begins here)
            log_none -= math.log1p(-a(farthest))
            if u > -math.expm1(log_none):
                break
            farthest += 1
        return sorted([farthest] + [d for d in range(1, farthest) if self.uniform() <= a(d)])

    def _offset(self, first: bool) -> int:
        """G = J - (d-1)*k1 - 1 for an update placed in this block: the window then begins at
        ``block + k1 - 1 - G``. Geometric (``P(G >= g) = q**g``); truncated to ``[0, k1)`` in a later
        block, unbounded in the first (clipped there at step 0)."""
        k, q = self.schedule.k1, self.schedule.q
        u = self.uniform()
        if first:
            return max(0, math.ceil(math.log(u) / math.log(q)) - 1)
        v = u * (1 - q**k) + q**k  # P(G >= g) = (q**g - q**k1) / (1 - q**k1)
        return min(k - 1, max(0, math.ceil(math.log(v) / math.log(q)) - 1))
