"""Which updates TBPTT(k1, k2) makes, which windows they cover and which errors they inject.

Pure Python, no torch: the contract of ``SEMANTICS.md`` as index arithmetic. Updates fall at stream
positions T = k1, 2*k1, ...; the update at T (previous update at P) has the window ``[max(0, T-k2), T)``
and injects the errors ``[max(P, T-k2), T)`` (``errors="new"``) or the whole window
(``errors="window"``). A stream that ends inside a block gets that block clipped at its end.

References: Williams & Peng (1990), BPTT(h; h'); Sutskever (2013), TBPTT(k1, k2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Protocol

from .validate import non_negative_int, one_of, positive_int

Errors = Literal["new", "window"]
_ERRORS = ("new", "window")
_N = "meaning n, the whole stream"


@dataclass(frozen=True)
class Update:
    """One weight update: window ``[start, stop)``, errors injected on ``[loss_start, stop)``.

    All indices are 0-based stream positions, half-open.
    """

    start: int
    loss_start: int
    stop: int

    @property
    def window(self) -> int:
        """Steps the update backpropagates through."""
        return self.stop - self.start

    @property
    def errors(self) -> int:
        """Steps whose errors the update injects."""
        return self.stop - self.loss_start


@dataclass(frozen=True)
class TBPTT:
    """Truncated backpropagation through time, TBPTT(k1, k2).

    Every ``k1`` steps of a stream the weights are updated with the gradient of the injected errors,
    backpropagated through the last ``k2`` steps. ``None`` for either means n, the whole stream so
    far: ``TBPTT(None, None)`` is full BPTT, ``TBPTT(1, None)`` Williams & Peng's real-time BPTT.

    ``errors="new"`` (default) injects each error once, in the first window that holds it;
    ``errors="window"`` injects every error of the window.
    """

    k1: Optional[int]
    k2: Optional[int]
    errors: Errors = "new"

    def __post_init__(self) -> None:
        # stored as plain ints, so that numpy integers compare, hash and print alike
        object.__setattr__(self, "k1", positive_int(self.k1, "k1", none=_N))
        object.__setattr__(self, "k2", positive_int(self.k2, "k2", none=_N))
        one_of(self.errors, "errors", _ERRORS)

    # ----------------------------------------------------------------------------------------
    # presets
    @classmethod
    def full(cls) -> "TBPTT":
        """TBPTT(n, n): classical BPTT, one update at the end of the stream."""
        return cls(None, None)

    @classmethod
    def williams_peng(cls) -> "TBPTT":
        """TBPTT(1, n): an update at every step, back to the start of the stream."""
        return cls(1, None)

    @classmethod
    def chunked(cls, k: int) -> "TBPTT":
        """TBPTT(k, k): split the stream into chunks of k, carry the state, detach."""
        return cls(k, k)

    @classmethod
    def parse(cls, text: str, errors: Errors = "new") -> "TBPTT":
        """Read ``"5,20"``, ``"n,n"``, ``"TBPTT(1,n)"`` into a schedule."""
        body = text.strip()
        if body.upper().startswith("TBPTT(") and body.endswith(")"):
            body = body[6:-1]
        parts = [p.strip() for p in body.split(",")]
        if len(parts) == 3 and parts[2].startswith("errors="):  # as str() writes it
            errors = parts.pop()[len("errors="):]  # type: ignore[assignment]
        if len(parts) != 2:
            raise ValueError(f"expected a configuration like '5,20' or 'n,n'; got {text!r}")
        ks: list[Optional[int]] = []
        for part in parts:
            if part.lower() == "n":
                ks.append(None)
            elif part.isdigit():
                ks.append(int(part))
            else:
                raise ValueError(
                    f"expected k1,k2 as positive ints or 'n' (e.g. '5,20', '1,n'); got {text!r}"
                )
        return cls(ks[0], ks[1], errors)

    def __str__(self) -> str:
        def k(v: Optional[int]) -> str:
            return "n" if v is None else str(v)

        suffix = "" if self.errors == "new" else ", errors=window"
        return f"TBPTT({k(self.k1)},{k(self.k2)}{suffix})"

    # ----------------------------------------------------------------------------------------
    # index arithmetic
    def block_end(self, previous: int) -> Optional[int]:
        """Stream position of the update after the one at ``previous`` (None: only at the end)."""
        return None if self.k1 is None else previous + self.k1

    def window_start(self, position: int) -> int:
        """First step of the window of an update at ``position``."""
        return 0 if self.k2 is None else max(0, position - self.k2)

    def update(self, previous: int, stop: Optional[int] = None) -> Optional[Update]:
        """The update closing the block that starts at ``previous``.

        ``stop`` is where the stream ends when it ends inside this block: the block's window and
        errors are clipped there (None if nothing is left to inject). With ``k1=None`` the block
        runs to the end of the stream, so ``stop`` is required.
        """
        end = self.block_end(previous)
        if end is None:
            if stop is None:
                raise ValueError("with k1 = n the block only closes at the end of the stream")
            end = stop
        clipped = end if stop is None else min(end, stop)
        start = self.window_start(end)
        loss_start = start if self.errors == "window" else max(previous, start)
        if loss_start >= clipped:
            return None
        return Update(start, loss_start, clipped)

    def updates(self, n: int) -> list[Update]:
        """Every update on a stream of ``n`` steps, in order."""
        n = non_negative_int(n, "n", "the stream length")
        out: list[Update] = []
        previous = 0
        while previous < n:
            end = self.block_end(previous)
            u = self.update(previous, stop=n if end is None or end > n else None)
            if u is not None:
                out.append(u)
            previous = n if end is None else end
        return out

    def saved_state_position(self, previous: int) -> Optional[int]:
        """Where inside the block starting at ``previous`` a later window begins, if anywhere.

        The state there must be kept when the step is first computed; it enters that later window.
        """
        end = self.block_end(previous)
        if end is None or self.k2 is None:
            return None
        q = end + self.k1 - self.k2  # the next window's start, then later ones k1 apart
        if q >= end:
            return None
        if q < previous:
            q += ((previous - q + self.k1 - 1) // self.k1) * self.k1
        return q if previous <= q < end else None

    def cost(self, n: int) -> dict[str, int]:
        """Steps a stream of ``n`` steps costs under each strategy (forward, backward, memory)."""
        return updates_cost(self.updates(n), n)

    def plan(self, uniform: Optional[Callable[[], float]] = None) -> "FixedPlan":
        """The schedule as the engine follows it (no draws, no decisions: index arithmetic)."""
        return FixedPlan(self)


def updates_cost(updates: list[Update], n: int) -> dict[str, int]:
    """Steps a stream of ``n`` steps with these ``updates`` costs: updates, forward steps under each
    strategy (``stored``: each step once; ``recompute``: each window once, the new steps inside
    it), backward steps, and the longest window (the activations held at once)."""
    forward_recompute = 0
    previous = 0
    for u in updates:
        forward_recompute += u.stop - min(u.start, previous)
        previous = u.stop
    return {
        "updates": len(updates),
        "forward_stored": n,
        "forward_recompute": forward_recompute,
        "backward": sum(u.window for u in updates),
        "max_window": max((u.window for u in updates), default=0),
    }


class Plan(Protocol):
    """A schedule as the engine follows it, block by block, with what its draws or decisions so far
    fix. The engine asks, for the block starting at ``previous`` (the last update's position):"""

    def block_end(self, previous: int) -> Optional[int]:
        """Where the block's update falls (None: only at the end of the stream)."""

    def update(self, previous: int, stop: Optional[int] = None) -> Optional[Update]:
        """The update closing the block (``stop``: the stream ends there, inside the block)."""

    def starts_in(self, previous: int, end: int) -> list[int]:
        """Positions strictly inside ``(previous, end)`` where a later window begins: the state there
        must be kept when the block runs."""

    def reach(self, previous: int) -> int:
        """The first step a later window can need, once the block before ``previous`` closed."""

    def window_length(self, update: Update) -> Optional[int]:
        """The window the update was given (k2 in force, or the L drawn; None for n)."""

    def closed(self, update: Update) -> None:
        """The update was made."""

    def reset(self, ended_at: int = 0) -> None:
        """The streams ended after ``ended_at`` steps; the next block starts a new stream at 0."""

    def state_dict(self) -> dict:
        """What the draws and decisions so far are, as plain data."""

    def load_state_dict(self, saved: dict) -> None:
        """Continue from ``state_dict``."""


class FixedPlan:
    """TBPTT(k1, k2)'s plan: nothing to draw or decide, every answer is index arithmetic."""

    def __init__(self, schedule: TBPTT) -> None:
        self.schedule = schedule

    def block_end(self, previous: int) -> Optional[int]:
        return self.schedule.block_end(previous)

    def update(self, previous: int, stop: Optional[int] = None) -> Optional[Update]:
        return self.schedule.update(previous, stop)

    def starts_in(self, previous: int, end: int) -> list[int]:
        p = self.schedule.saved_state_position(previous)
        return [p] if p is not None and previous < p < end else []

    def reach(self, previous: int) -> int:
        end = self.schedule.block_end(previous)
        return previous if end is None else min(previous, self.schedule.window_start(end))

    def window_length(self, update: Update) -> Optional[int]:
        return self.schedule.k2

    def closed(self, update: Update) -> None:
        pass

    def reset(self, ended_at: int = 0) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, saved: dict) -> None:
        pass
