"""Where a sweep stands, shown while it runs: a progress bar on a terminal, and in a log (output not
a terminal) one line every few seconds saying how many runs are done, where each running one is
(epoch, loss, what is left of its budget) and about how long the sweep has left.

Runs report ``("started", index)`` and ``("progress", index, {"epoch", "loss", "done", "left"})``
events (``done``: the share of the run's budget spent, 0 to 1); the sweep calls ``run_done`` when a
run ends.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional


def clock(seconds: float) -> str:
    """``"42 s"``, ``"3 min 20 s"``, ``"1 h 05 min"``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class SweepProgress:
    """Progress of ``runs`` runs named by ``names[index]``: a rich bar on a terminal
    (``console.is_terminal``), else a line on ``console`` every ``every`` seconds; nothing when
    ``show`` is False."""

    def __init__(self, show: bool, runs: int, names: dict[int, str], console: Any = None, every: float = 5.0,
                 now: Callable[[], float] = time.perf_counter) -> None:
        self.show, self.runs, self.names, self.every, self.now = show, runs, names, every, now
        self.console = console
        self.done_runs = 0
        self.running: dict[int, dict] = {}
        self.bar: Any = None
        self.started = self.last_line = now()

    def __enter__(self) -> "SweepProgress":
        if not self.show:
            return self
        if self.console is None:
            from rich.console import Console

            self.console = Console()
        if self.console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                TextColumn("left"), TimeRemainingColumn(), console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self._describe(), total=float(self.runs))
        self.started = self.last_line = self.now()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    # ------------------------------------------------------------------------------------------
    def fraction(self) -> float:
        """Share of the sweep done: finished runs, and the budget spent by the running ones."""
        running = sum(min(1.0, s.get("done", 0.0)) for s in self.running.values())
        return min(1.0, (self.done_runs + running) / max(self.runs, 1))

    def time_left(self) -> Optional[float]:
        """Seconds left at the pace so far; None before anything is done."""
        done, spent = self.fraction(), self.now() - self.started
        if done <= 0 or spent <= 0:
            return None
        return spent * (1 - done) / done

    def _describe(self) -> str:
        return f"runs {self.done_runs}/{self.runs}"

    def _running_text(self, index: int) -> str:
        state = self.running[index]
        parts = []
        if "epoch" in state:
            parts.append(f"epoch {state['epoch']}")
        if math.isfinite(state.get("loss", math.nan)):
            parts.append(f"loss {state['loss']:.4g}")
        if state.get("left"):
            parts.append(f"{state['left']} left")
        return self.names.get(index, f"run {index}") + (f" ({', '.join(parts)})" if parts else "")

    def line(self) -> str:
        """The log line: runs done, the running ones, elapsed and left."""
        left = self.time_left()
        running = "; ".join(self._running_text(i) for i in sorted(self.running))
        text = f"[{clock(self.now() - self.started)}] runs done {self.done_runs}/{self.runs}"
        if running:
            text += f"; running: {running}"
        if left is not None:
            text += f"; about {clock(left)} left"
        return text

    def _refresh(self) -> None:
        if not self.show:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=self.fraction() * self.runs, description=self._describe())
        elif self.now() - self.last_line >= self.every:
            self.console.print(self.line(), soft_wrap=True, highlight=False, markup=False)
            self.last_line = self.now()

    # ------------------------------------------------------------------------------------------
    def run_started(self, index: int) -> None:
        self.running.setdefault(index, {})
        self._refresh()

    def event(self, event: tuple) -> None:
        """A run's report: ``("started", index)`` or ``("progress", index, state)``."""
        if event[0] == "started":
            self.running.setdefault(event[1], {})
        elif event[0] == "progress":
            self.running[event[1]] = dict(event[2])
        self._refresh()

    def run_done(self, index: int, summary: str = "") -> None:
        """A run ended (finished, stopped, diverged or failed); ``summary`` is logged in a log."""
        self.running.pop(index, None)
        self.done_runs += 1
        if self.show and self.bar is None and summary:
            self.console.print(f"[{clock(self.now() - self.started)}] done {self.done_runs}/{self.runs}: {summary}",
                               soft_wrap=True, highlight=False, markup=False)
        self._refresh()

    def tick(self) -> None:
        """Called while waiting: a line is due every ``every`` seconds even when no run reports."""
        self._refresh()
