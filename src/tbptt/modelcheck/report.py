"""What ``check_model`` found: one ``Check`` per experiment, gathered in a ``ModelReport``."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Check:
    """One check: its ``name``, what it ``measured``, the ``problems`` it found and ``notes``.

    ``passed`` is False when it failed (a failure already explained by an earlier problem has no
    problem of its own), None when it could not run.
    """

    name: str
    measured: str
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    passed: Optional[bool] = True

    @property
    def status(self) -> str:
        return {True: "ok", False: "FAIL", None: "skip"}[self.passed]


@dataclass(frozen=True)
class ModelReport:
    """What ``check_model`` found. ``ok``: no problem; ``problems``: each says what is wrong, where
    (cut point, step, row, state leaf), by how much and the likely fix; ``notes``: what is allowed
    but worth knowing; ``str(report)`` lists every check with its measured error."""

    model: str
    sample: str
    checks: tuple[Check, ...]

    @property
    def problems(self) -> list[str]:
        return [p for c in self.checks for p in c.problems]

    @property
    def notes(self) -> list[str]:
        return [n for c in self.checks for n in c.notes]

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.passed is not False for c in self.checks)

    def __str__(self) -> str:
        count = len(self.problems)
        verdict = "keeps the engine's contract" if self.ok else f"{count} problem{'s' * (count != 1)}"
        lines = [f"check_model: {self.model} on {self.sample}: {verdict}"]
        width = max(len(c.name) for c in self.checks)
        for c in self.checks:
            lines.append(textwrap.fill(c.measured, 100, initial_indent=f"  {c.status:<4}  {c.name:<{width}}  ",
                                       subsequent_indent=" " * (width + 8), break_long_words=False))
        for title, items in (("problems", self.problems), ("notes", self.notes)):
            if items:
                lines.append(f"{title}:")
                for i, text in enumerate(items, 1):
                    lines.append(textwrap.fill(text, 100, initial_indent=f"  {i}. ", subsequent_indent="     ",
                                               break_long_words=False, break_on_hyphens=False))
        return "\n".join(lines)


class ModelContractError(ValueError):
    """A model that breaks the engine's contract; ``report`` is the ``ModelReport`` that says how."""

    def __init__(self, report: ModelReport) -> None:
        self.report = report
        super().__init__(f"the model does not keep the engine's contract (tbptt.check_model):\n{report}")
