"""How much training a run may spend, and the meter that says when to stop.

A ``Budget`` is one limit, written ``KIND:AMOUNT``:

- ``epochs:N``: N passes over the training streams;
- ``cpu:S``: S CPU seconds of training (this process's CPU time inside ``train_on``: forward,
  backward and optimizer steps; validation is not counted, so that a configuration whose epochs are
  short, and which therefore validates more often, is not charged for it);
- ``backward:N``: N backward steps, the gradient cost (each update costs its window's length;
  ``SEMANTICS.md``, "Cost");
- ``seconds:S``: S wall-clock seconds of the whole fit, validation and checkpoints included (what
  ``fit(max_seconds=S)`` sets).

A ``BudgetMeter`` counts what a fit has spent of its budgets. The trainer asks it before each
update whether to stop (``should_stop``), so a run stops between two updates, inside an epoch or
inside one ``train_on`` call; the updates it did not make stay pending and a resumed run makes them
(``Trainer.train_pending``). An update cannot be cut: its gradient needs its whole window. So the
meter stops before the next update when stopping now leaves less of the budget unspent than that
update would overspend, taking the last update's cost as the next one's (the first update of a run
always runs). A run thus ends within half an update's cost of its budget, on either side, while
updates cost about the same; TBPTT(n,n) makes one update per pass over the streams, so there the
unit of stopping is a whole pass (and the first pass is always made whole).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

from .validate import InvalidArgument, non_negative_number, one_of, positive_int

KINDS = ("epochs", "cpu", "backward", "seconds")
_UNITS = {"epochs": "epochs", "cpu": "CPU s of training", "backward": "backward steps",
          "seconds": "s of wall-clock time"}
_COUNTED = ("cpu", "backward", "seconds")  # spent during updates; epochs are counted by the fit loop


@dataclass(frozen=True)
class Budget:
    """One limit on a run's training: ``kind`` (one of ``KINDS``) and ``amount`` (an int for epochs
    and backward steps, seconds for cpu and seconds). ``Budget.parse("cpu:30")``."""

    kind: str
    amount: float

    def __post_init__(self) -> None:
        one_of(self.kind, "budget", KINDS)
        if self.kind in ("epochs", "backward"):
            object.__setattr__(self, "amount", positive_int(self.amount, "budget", f"{self.kind} of the budget"))
        else:  # 0 seconds: stop before the first update
            object.__setattr__(self, "amount", non_negative_number(self.amount, "budget", "seconds"))

    @classmethod
    def parse(cls, text: object, name: str = "budget") -> "Budget":
        """Read ``"epochs:N"``, ``"cpu:SECONDS"``, ``"backward:STEPS"`` or ``"seconds:SECONDS"``."""
        expected = "KIND:AMOUNT with KIND epochs, cpu, backward or seconds, e.g. cpu:30 or backward:50000"
        if isinstance(text, Budget):
            return text
        if not isinstance(text, str):
            raise InvalidArgument(name, text, expected)
        kind, sep, amount = text.strip().partition(":")
        if not sep or kind not in KINDS:
            raise InvalidArgument(name, text, expected)
        try:
            value = int(amount) if kind in ("epochs", "backward") else float(amount)
        except ValueError:
            raise InvalidArgument(name, text, expected) from None
        try:
            return cls(kind, value)
        except InvalidArgument:
            raise InvalidArgument(name, text, expected + " (a positive amount)") from None

    def __str__(self) -> str:
        return f"{self.kind}:{self.amount:g}"

    def describe(self) -> str:
        """``"3 CPU s of training"``, ``"30 epochs"``."""
        return f"{self.amount:g} {_UNITS[self.kind]}"


class BudgetMeter:
    """What a fit has spent of its ``budgets`` (see the module's docstring).

    ``backward_steps`` reads the engine's running count of backward steps. ``start()`` starts the
    wall clock; CPU time is counted only inside ``training()``; ``update_done()`` after each
    update notes its cost, which ``should_stop()`` takes as the next update's. ``state_dict`` holds
    what was spent, so that a resumed run goes on spending the same budget.
    """

    def __init__(self, budgets: Sequence[Budget], backward_steps: Callable[[], int]) -> None:
        self.budgets = tuple(budgets)
        self.limits = {b.kind: float(b.amount) for b in self.budgets}
        self._backward = backward_steps
        self._earlier = {kind: 0.0 for kind in KINDS}  # spent before this process, or before start()
        self._cost = {kind: 0.0 for kind in _COUNTED}  # the last update's, per kind
        self._wall0: Optional[float] = None
        self._cpu0: Optional[float] = None  # set while inside training()
        self._cpu_here = 0.0
        self._backward0 = 0
        self._mark: dict[str, float] = {}
        self.stopped = False  # latched: once the meter has said stop, it keeps saying so
        self.stopped_by = ""  # the budget that said it, as written ("cpu:3")

    @property
    def stops_updates(self) -> bool:
        """Whether a budget may stop training between updates (one of cpu, backward, seconds)."""
        return any(kind in _COUNTED for kind in self.limits)

    # ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start counting (at the start of a fit, after any resume)."""
        self._wall0 = time.perf_counter()
        self._backward0 = self._backward()
        self._cpu_here = 0.0
        self._mark = self._now()

    @contextmanager
    def training(self) -> Iterator[None]:
        """Count this process's CPU time inside the block as training."""
        if self._cpu0 is not None:  # nested: the outer block counts
            yield
            return
        self._cpu0 = time.process_time()
        try:
            yield
        finally:
            self._cpu_here += time.process_time() - self._cpu0
            self._cpu0 = None

    def spent(self, kind: str) -> float:
        """What has been spent of ``kind`` so far, earlier processes of a resumed run included."""
        here = 0.0
        if kind == "seconds" and self._wall0 is not None:
            here = time.perf_counter() - self._wall0
        elif kind == "cpu":
            here = self._cpu_here + (time.process_time() - self._cpu0 if self._cpu0 is not None else 0.0)
        elif kind == "backward" and self._wall0 is not None:
            here = float(self._backward() - self._backward0)
        return self._earlier[kind] + here

    def epoch_done(self) -> None:
        """One more whole epoch (the fit loop calls it)."""
        self._earlier["epochs"] += 1

    def _now(self) -> dict[str, float]:
        return {kind: self.spent(kind) for kind in _COUNTED}

    def update_done(self) -> None:
        """Note the cost of the update just made (what was spent since the last note)."""
        now = self._now()
        self._cost = {kind: now[kind] - self._mark.get(kind, now[kind]) for kind in _COUNTED}
        self._mark = now

    def mark(self) -> None:
        """Start the next update's cost from here (time between calls is not an update's cost)."""
        self._mark = self._now()

    def should_stop(self) -> bool:
        """Whether to stop before the next update: some budget is spent, or would be overspent by the
        next update (at the last one's cost) by more than stopping now leaves unspent."""
        if not self.stopped:
            for budget in self.budgets:
                kind = budget.kind
                if kind in _COUNTED and budget.amount - self.spent(kind) <= self._cost[kind] / 2:
                    self.stopped, self.stopped_by = True, str(budget)
                    break
        return self.stopped

    # ------------------------------------------------------------------------------------------
    def fraction(self, epochs: Optional[float] = None) -> float:
        """How much of the budget is spent, 0 to 1: the largest share of any limit (``epochs``:
        epochs done, fractions included, when the fit knows them better than whole epochs)."""
        shares = []
        for kind, limit in self.limits.items():
            spent = epochs if kind == "epochs" and epochs is not None else self.spent(kind)
            shares.append(spent / limit)
        return min(1.0, max(shares, default=0.0))

    def left(self) -> str:
        """What is left of the budget that runs out first, in its units (``"1.2 CPU s of training"``)."""
        if not self.limits:
            return ""
        kind = max(self.limits, key=lambda k: self.spent(k) / self.limits[k])
        remaining = max(0.0, self.limits[kind] - self.spent(kind))
        return f"{remaining:.3g} {_UNITS[kind]}"

    def state_dict(self) -> dict[str, float]:
        """What was spent, per kind."""
        return {kind: self.spent(kind) for kind in KINDS}

    def load_state_dict(self, saved: dict[str, float]) -> None:
        """Go on from what a run spent before (call before ``start``)."""
        for kind in KINDS:
            value = float(saved.get(kind, 0.0))
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"a spent budget must be a number >= 0; got {kind}={value!r}")
            self._earlier[kind] = value


def meter_for(budgets: Sequence[Optional[Budget]], backward_steps: Callable[[], int]) -> Optional[BudgetMeter]:
    """A meter for the budgets given (None entries left out); None if there are none."""
    kept = [b for b in budgets if b is not None]
    return BudgetMeter(kept, backward_steps) if kept else None
