"""The Pareto front of skill against CPU time: at each amount of training, which configuration no
other beats on both (as good a validation metric with no more CPU seconds).

Each configuration's curve is its validation metric at the end of each epoch (and where a budget
stopped it) against the CPU seconds of training spent by then, averaged over seeds epoch by epoch.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Sequence

from .summary import Run, group_runs, label


@dataclass(frozen=True)
class FrontPoint:
    """A point of a configuration's curve: CPU seconds of training, validation metric, the epoch."""

    config: str
    cpu: float
    metric: float
    epoch: int


@dataclass(frozen=True)
class FrontStretch:
    """Where one configuration holds the front: from ``start`` CPU seconds until ``stop`` (where the
    next configuration takes over, or its own last point), its metric going from ``first`` to
    ``last``."""

    config: str
    start: float
    stop: float
    first: float
    last: float


def curves(runs: Sequence[Run]) -> dict[str, list[FrontPoint]]:
    """Each configuration's mean curve over seeds (name as ``label`` gives it): epoch by epoch while
    every seed is still running, then one last point, the seeds' ends (their final metrics, at their
    mean CPU time), so that a curve ends where the comparison's final metric is."""
    groups = group_runs([r for r in runs if r.get("status") != "failed" and r.get("epochs")])
    strategies = len({s for _, s in groups})
    out: dict[str, list[FrontPoint]] = {}
    for (config, strategy), group in groups.items():
        name = label({"config": config, "strategy": strategy}, strategies)
        series = [[(e.get("train_cpu"), e.get("valid_metric")) for e in r["epochs"]] for r in group]
        shortest = min(len(s) for s in series)
        points = [_mean_point(name, [s[i] for s in series], i + 1) for i in range(shortest - 1)]
        points.append(_mean_point(name, [s[-1] for s in series], max(len(s) for s in series)))
        out[name] = [p for p in points if p is not None]
    return out


def _mean_point(name: str, pairs: list, epoch: int) -> "FrontPoint | None":
    pairs = [(c, m) for c, m in pairs if _finite(c) and _finite(m)]
    if not pairs:
        return None
    return FrontPoint(name, statistics.fmean(c for c, _ in pairs), statistics.fmean(m for _, m in pairs), epoch)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def pareto_front(curves_by_config: dict[str, list[FrontPoint]], higher_is_better: bool,
                 tolerance: float = 0.0) -> list[FrontPoint]:
    """The points no other point beats on both: none has as good a metric with fewer CPU seconds,
    or a better one with as few. In order of CPU seconds; the metric improves along it.

    ``tolerance``: a point joins only if it improves on the front so far by more than this (the
    spread over seeds, say), so that the front does not alternate between configurations whose
    curves differ by noise."""
    points = sorted((p for ps in curves_by_config.values() for p in ps),
                    key=lambda p: (p.cpu, -p.metric if higher_is_better else p.metric))
    front: list[FrontPoint] = []
    for p in points:
        if not front:
            front.append(p)
        elif higher_is_better and p.metric > front[-1].metric + tolerance:
            front.append(p)
        elif not higher_is_better and p.metric < front[-1].metric - tolerance:
            front.append(p)
    return front


def stretches(front: Sequence[FrontPoint]) -> list[FrontStretch]:
    """The front as runs of one configuration each, in order of CPU seconds."""
    out: list[FrontStretch] = []
    for p in front:
        if out and out[-1].config == p.config:
            last = out[-1]
            out[-1] = FrontStretch(p.config, last.start, p.cpu, last.first, p.metric)
        else:
            out.append(FrontStretch(p.config, p.cpu, p.cpu, p.metric, p.metric))
    return [replace(s, stop=nxt.start) for s, nxt in zip(out, out[1:])] + out[-1:]


def describe(front_stretches: Sequence[FrontStretch], metric_name: str) -> list[str]:
    """One line per stretch: ``"TBPTT(n,n)  from 0.05 s: accuracy 0.21 -> 0.34 (to 0.9 s)"``."""
    width = max((len(s.config) for s in front_stretches), default=0)
    lines = []
    for s in front_stretches:
        change = f"{s.first:.4g}" if s.first == s.last else f"{s.first:.4g} -> {s.last:.4g}"
        until = f" (to {s.stop:.3g} s)" if s.stop > s.start else ""
        lines.append(f"{s.config:<{width}}  from {s.start:.3g} s: {metric_name} {change}{until}")
    return lines
