"""Output that holds up both on a terminal and in a log.

On a terminal, rich draws as wide as the terminal: boxes, rules, a live progress bar. When the
output is a file or a pipe (a log), rich would assume 80 columns and cut wide tables ("steps…"),
so there the console is as wide as the widest table needs, text lines are not wrapped, and boxes
and rules become plain lines.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Optional

LOG_WIDTH = 1000
"""Columns of a console writing to a log: enough for any table, so none is cut."""


def make_console(stderr: bool = False, quiet: bool = False) -> Any:
    """A rich ``Console``: the terminal's width on a terminal, else ``LOG_WIDTH`` with no wrapping."""
    from rich.console import Console

    console = Console(stderr=stderr, quiet=quiet)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, quiet=quiet, width=LOG_WIDTH, soft_wrap=True)


def heading(console: Any, text: str) -> None:
    """A section's title: a rule on a terminal, a plain line in a log."""
    if console.is_terminal:
        console.rule(text)
    else:
        console.print(f"== {text} ==", markup=False, highlight=False)


def card(console: Any, title: str, lines: Iterable[str]) -> None:
    """A block of text under a title: a box on a terminal, indented lines in a log."""
    lines = list(lines)
    if console.is_terminal:
        from rich.panel import Panel
        from rich.text import Text

        console.print(Panel(Text("\n".join(lines)), title=title, title_align="left", expand=True))
    else:
        console.print(title, markup=False, highlight=False)
        for line in lines:
            console.print(f"  {line}", markup=False, highlight=False)


class FitLog:
    """A ``fit`` callback for a log: a line every ``every`` seconds while an epoch runs (its share
    done, updates, the last loss, about how long is left) and one at each epoch's end."""

    def __init__(self, console: Any, steps: int, epochs: Optional[int], every: float = 5.0) -> None:
        from ..experiments.progress import clock

        self.console, self.steps, self.epochs, self.every, self.clock = console, steps, epochs, every, clock
        self.started = self.last = time.perf_counter()
        self.epoch, self.updates, self.loss = 0, 0, math.nan

    def _done(self, trainer: Any) -> float:
        meter = getattr(trainer, "budget", None)
        epochs = self.epoch + trainer.position / max(self.steps, 1)
        if meter is not None and meter.limits:
            return meter.fraction(epochs)
        return epochs / self.epochs if self.epochs else 0.0

    def _say(self, text: str, trainer: Any) -> None:
        elapsed = time.perf_counter() - self.started
        done = self._done(trainer)
        left = f", about {self.clock(elapsed * (1 - done) / done)} left" if 0 < done < 1 else ""
        self.console.print(f"[{self.clock(elapsed)}] {text}{left}", markup=False, highlight=False)
        self.last = time.perf_counter()

    def on_update(self, trainer: Any, record: Any) -> None:
        self.updates += 1
        if not record.skipped:
            self.loss = record.loss
        if time.perf_counter() - self.last >= self.every:
            of = f"/{self.epochs}" if self.epochs else ""
            share = trainer.position / max(self.steps, 1)
            self._say(f"epoch {self.epoch + 1}{of}: {share:.0%} of its steps, {self.updates:,} updates, "
                      f"last loss {self.loss:.4g}", trainer)

    def on_epoch_end(self, trainer: Any, info: dict) -> None:
        if not info.get("partial"):
            self.epoch = info["epoch"]
        metric = f", valid metric {info['valid_metric']:.4g}" if "valid_metric" in info else ""
        self._say(f"epoch {info['epoch']} {'stopped' if info.get('partial') else 'done'}: train loss "
                  f"{info['train_loss']:.4g}, valid loss {info.get('valid_loss', math.nan):.4g}{metric}", trainer)
