"""The answer a comparison gives: which TBPTT(k1, k2) to use on this task at this budget, and why.

The configuration recommended is the one with the best mean final validation metric among those
that did not diverge. The card says its skill against the trivial baseline and against the next
best, what it cost, and why, in the terms of the question itself: k2 against the dependency length
(the task's known one, or where the trained models' gradient has its mass, measured by the lag
probe), k1 against the number of updates and their cost, and the stability seen. Two
configurations are "within the spread over seeds" when their means differ by no more than the sum
of their standard deviations over seeds: the comparison cannot rank them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..diagnostics import recommend_k2
from .front import FrontStretch, curves, describe, pareto_front, stretches
from .summary import Row, Run, label

FRACTION = 0.01
"""Share of the gradient's mass a window may drop when the probe's k2 is quoted (``recommend_k2``)."""


def _n(k: Optional[int]) -> str:
    return "n" if k is None else str(k)


def _plural(count: float, word: str) -> str:
    return f"{count:,.0f} {word}" + ("" if round(count) == 1 else "s")


@dataclass(frozen=True)
class Answer:
    """The recommendation (``choice``, a summary row), the ``runner_up``, the configurations
    ``tied`` with it (within the spread over seeds), what it cost, why, and the Pareto front."""

    task: str
    budget: str
    headline: str
    cost: str
    why: list[str]
    choice: Row
    runner_up: Optional[Row] = None
    tied: list[Row] = field(default_factory=list)
    front: list[FrontStretch] = field(default_factory=list)
    front_lines: list[str] = field(default_factory=list)
    dependency: list[str] = field(default_factory=list)
    front_tolerance: float = 0.0

    def lines(self) -> list[str]:
        """The card as plain text lines: the answer, its cost, why."""
        return [self.headline, self.cost, *[f"- {w}" for w in self.why]]


def _spread(row: Row) -> float:
    sd = row.get("final_metric_std", math.nan)
    return sd if isinstance(sd, float) and math.isfinite(sd) else 0.0


def within_spread(a: Row, b: Row) -> bool:
    """Whether two configurations' mean final metrics differ by no more than the sum of their
    standard deviations over seeds."""
    return abs(a["final_metric"] - b["final_metric"]) <= _spread(a) + _spread(b)


def _score(row: Row) -> str:
    sd = row.get("final_metric_std", math.nan)
    seeds = row.get("runs", 0) - row.get("failed", 0)
    return f"{row['final_metric']:.3g}" + (f" ± {sd:.2g}" if seeds > 1 and math.isfinite(sd) else "")


def budget_text(meta: dict) -> str:
    """``"3 CPU s of training per run"`` or ``"30 epochs per run"``, from the sweep's settings."""
    from ..budget import Budget

    settings = meta.get("settings", {})
    if settings.get("budget"):
        return Budget.parse(settings["budget"]).describe() + " per run"
    return f"{settings.get('epochs', '?')} epochs per run"


def recommend(rows: Sequence[Row], runs: Sequence[Run], meta: dict) -> Optional[Answer]:
    """The answer card of a comparison (see the module's docstring); None if no run finished."""
    finished = [r for r in rows if math.isfinite(r["final_metric"]) and r["runs"] > r["failed"]]
    if not finished:
        return None
    stable = [r for r in finished if not r["diverged"]] or finished
    higher = meta.get("higher_is_better", True)
    ranked = sorted(stable, key=lambda r: r["final_metric"], reverse=higher)
    choice, others = ranked[0], ranked[1:]
    runner_up = others[0] if others else None
    tied = [r for r in others if within_spread(choice, r)]
    strategies = len({r["strategy"] for r in rows})
    name = lambda r: label(r, strategies)  # noqa: E731
    budget = budget_text(meta)
    baseline = meta.get("baseline", math.nan)
    versus = f"{meta.get('baseline_name', 'baseline')} {baseline:.3g}"
    if runner_up is not None:
        versus += f"; next best {name(runner_up)} {_score(runner_up)}"
    headline = (f"Use {name(choice)} on {meta.get('task', 'this task')} at {budget}: validation "
                f"{meta.get('metric_name', 'metric')} {_score(choice)} ({versus}).")
    cost = (f"Cost per run: {choice['train_cpu']:.2g} CPU s of training ({choice['cpu_time']:.2g} s with "
            f"validation), {_plural(choice['updates'], 'update')}, {choice['backward_steps']:,.0f} backward steps, "
            f"{choice['peak_graph_mb']:.2g} MB of autograd graph at its peak.")
    why = [_why_k2(choice, finished, runs, meta, name), _why_k1(choice, finished, meta, name),
           _why_stability(choice, finished, name), _why_spread(choice, runner_up, tied, name)]
    tolerance = front_tolerance(finished, baseline)
    points = pareto_front(curves(runs), higher, tolerance)
    front = stretches(points)
    why.append(_why_front(choice, points, meta, name))
    return Answer(meta.get("task", ""), budget, headline, cost, [w for w in why if w], choice, runner_up, tied,
                  front, describe(front, meta.get("metric_name", "metric")), dependency_lines(rows, meta, strategies),
                  tolerance)


def front_tolerance(rows: Sequence[Row], baseline: float) -> float:
    """The smallest gain that counts on the front: the median spread over seeds, or 5% of the way
    from the baseline to the best final metric if that is larger (finer steps are noise here)."""
    spreads = sorted(_spread(r) for r in rows)
    median = spreads[len(spreads) // 2] if spreads else 0.0
    finals = [r["final_metric"] for r in rows]
    span = max(abs(f - baseline) for f in finals) if finals and math.isfinite(baseline) else 0.0
    return max(median, 0.05 * span)


def _why_front(choice: Row, front: Sequence, meta: dict, name) -> str:
    """A word when the front's best point is not the recommendation's end: a configuration that
    was better earlier and did not stay so (early stopping would have kept it)."""
    if not front:
        return ""
    best = front[-1]
    higher = meta.get("higher_is_better", True)
    tolerance = front_tolerance([choice], meta.get("baseline", math.nan))
    ahead = best.metric > choice["final_metric"] + tolerance if higher else best.metric < choice["final_metric"] - tolerance
    if best.config == name(choice) or not ahead:
        return ""
    return (f"{best.config} was better for a while: {best.metric:.3g} after {best.cpu:.2g} CPU s (epoch {best.epoch}, "
            "mean over seeds), but did not keep it to the end; with early stopping on the validation loss "
            "(patience, restore_best) it could be the choice.")


def probed_k2(row: Row, runs: Sequence[Run]) -> Optional[int]:
    """The k2 the lag probe recommends for the trained models of ``row``'s configuration (their
    gradient norms per lag averaged over seeds), None when it cannot tell."""
    curves_ = [r["lag_norms"] for r in runs if r["config"] == row["config"] and r.get("strategy") == row["strategy"]
               and r.get("lag_norms")]
    if not curves_:
        return None
    length = min(len(c) for c in curves_)
    mean = [sum(c[i] for c in curves_) / len(curves_) for i in range(length)]
    try:
        return recommend_k2(mean, FRACTION)
    except ValueError:
        return None


def reaches(row: Row, d: int) -> bool:
    """Whether a configuration's windows reach ``d`` steps back: k2 > d (or n); ARTBP's random windows
    reach every lag (with a probability that the compensation makes up for)."""
    return row.get("windows") == "random" or row.get("k2") is None or row["k2"] > d


def _why_k2(choice: Row, rows: Sequence[Row], runs: Sequence[Run], meta: dict, name) -> str:
    text = _why_window(choice, rows, runs, meta, name)
    if choice.get("windows") == "adaptive":  # its k2 is the mean of those it chose, not one fixed
        return f"AdaptiveTBPTT chose k2 as it trained, {choice.get('mean_k2', math.nan):.1f} on average: " + text
    return text


def _why_window(choice: Row, rows: Sequence[Row], runs: Sequence[Run], meta: dict, name) -> str:
    k1, k2, d = choice.get("k1"), choice.get("k2"), meta.get("dependency")
    if d is not None:
        short = [r for r in rows if not reaches(r, d)]
        best_short = max(short, key=lambda r: r["final_metric"], default=None) if meta.get("higher_is_better") else \
            min(short, key=lambda r: r["final_metric"], default=None)
        tail = ""
        if best_short is not None and best_short is not choice:
            tail = (f" The windows with k2 <= {d} ({', '.join(name(r) for r in short)}) cannot carry an error that far "
                    f"back; the best of them reached {best_short['final_metric']:.3g}.")
        if choice.get("windows") == "random":
            return (f"windows of random length, {choice.get('mean_k2', math.nan):.1f} steps on average, reach every "
                    f"lag, d = {d} included, with a probability the compensation makes up for: each update is an "
                    f"unbiased estimate of TBPTT({_n(k1)}, n)'s gradient.{tail}")
        if k2 is None:
            return (f"k2 = n: every error flows back to the stream's start, so it reaches the input the target "
                    f"depends on, d = {d} steps back (known for this task).{tail}")
        if k2 > d:
            reach = min(k1, k2 - d) if k1 is not None else k2 - d
            return (f"k2 = {k2} > d = {d} (the task's dependency length): an error can flow back to the input it "
                    f"depends on; {reach} of each update's {k1 if k1 is not None else 'n'} errors do "
                    f"(min(k1, k2 - d)).{tail}")
        return (f"k2 = {k2} <= d = {d}: no window spans the dependency, so what it learnt is not the dependency "
                f"itself; no configuration that spans it did better at this budget.")
    probe = probed_k2(choice, runs)
    if probe is None:
        return f"k2 = {_n(k2)}: the task's dependency length is unknown and the probe could not measure it."
    lead = (f"The lag probe of its trained models puts {100 * (1 - FRACTION):.0f}% of the gradient's mass within "
            f"{probe - 1} steps (a window of k2 = {probe} keeps it)")
    if k2 is None or k2 >= probe:
        return f"{lead}; k2 = {_n(k2)} keeps it, capturing the temporal structure the model learnt."
    return (f"{lead}; k2 = {k2} drops part of it, yet scores best here: at this budget longer windows "
            f"cost more per update than the structure they add is worth.")


def _why_k1(choice: Row, rows: Sequence[Row], meta: dict, name) -> str:
    k1 = choice.get("k1")
    each = lambda r: r["backward_steps"] / max(r["updates"], 1)  # noqa: E731
    often = "one update per pass over the streams" if k1 is None else f"an update every {_plural(k1, 'step')}"
    text = f"k1 = {_n(k1)}: {often}, {_plural(choice['updates'], 'update')} here ({each(choice):.0f} backward steps each)"
    others = [r for r in rows if r is not choice and r["updates"] > 0]
    if others:
        fewest, most = min(others, key=lambda r: r["updates"]), max(others, key=lambda r: r["updates"])
        text += f"; of the others {name(fewest)} made the fewest, {fewest['updates']:,.0f} ({each(fewest):.0f} each)"
        if most is not fewest:
            text += f", {name(most)} the most, {most['updates']:,.0f} ({each(most):.0f} each)"
    if (meta.get("settings", {}).get("budget") or "").startswith("cpu"):
        return text + (". At equal CPU time, frequent updates are cheap ones: k1 sets how often the weights move, "
                       "k2 what each move costs.")
    slowest = max(rows, key=lambda r: r.get("train_cpu", 0.0))
    return (text + f". At equal data the runs cost different CPU time: {name(slowest)} "
            f"{slowest['train_cpu']:.2g} s against {choice['train_cpu']:.2g} s for this one.")


def _why_stability(choice: Row, rows: Sequence[Row], name) -> str:
    seeds = choice["runs"] - choice["failed"]
    parts = [f"{choice['diverged']}/{seeds} runs diverged"]
    spikes = choice.get("grad_spikes", 0.0)
    parts.append("no gradient spikes (> 10x the run's median)" if not spikes else
                 f"{spikes:.2g} gradient spikes per run (> 10x the median)")
    parts.append(f"gradient norm median {choice['grad_norm_median']:.2g}, max {choice['grad_norm_max']:.2g}")
    unstable = [f"{name(r)} ({r['diverged']}/{r['runs'] - r['failed']} diverged)" for r in rows if r["diverged"]]
    spiky = [name(r) for r in rows if r is not choice and r.get("grad_spikes", 0) >= 1]
    text = "Stability: " + ", ".join(parts) + "."
    if unstable:
        text += " Diverged: " + ", ".join(unstable) + "."
    if spiky:
        text += " Gradient spikes in " + ", ".join(spiky) + "."
    return text


def _why_spread(choice: Row, runner_up: Optional[Row], tied: Sequence[Row], name) -> str:
    seeds = choice["runs"] - choice["failed"]
    if seeds < 2:
        return "One seed per configuration: there is no spread over seeds to judge the differences by."
    if tied:
        listed = ", ".join(f"{name(r)} ({_score(r)})" for r in tied)
        return (f"Within the spread over seeds: {listed}: the difference is no larger than the seeds' own "
                f"scatter, so this comparison cannot rank them; more seeds could.")
    if runner_up is None:
        return ""
    gap = abs(choice["final_metric"] - runner_up["final_metric"])
    return (f"Its lead over {name(runner_up)} ({gap:.2g}) is larger than the spread over {seeds} seeds "
            f"(sd {_spread(choice):.2g} and {_spread(runner_up):.2g}).")



def learnt_level(meta: dict) -> Optional[float]:
    """The final metric past which a configuration counts as having learnt a task's known
    dependency: halfway from the trivial baseline to a perfect score (1 for a score that is higher
    when better, such as accuracy; 0 for an error). Beating the baseline alone does not show it."""
    baseline = meta.get("baseline")
    if meta.get("dependency") is None or baseline is None or not math.isfinite(baseline):
        return None
    perfect = 1.0 if meta.get("higher_is_better") else 0.0
    return (baseline + perfect) / 2


def dependency_lines(rows: Sequence[Row], meta: dict, strategies: int = 1) -> list[str]:
    """For a task whose dependency length d is known: which configurations learnt it, those whose
    k2 exceeds d (a window reaches the input) apart from those whose k2 does not."""
    level, d = learnt_level(meta), meta.get("dependency")
    if level is None:
        return []
    higher = bool(meta.get("higher_is_better"))
    name = meta.get("metric_name", "metric")
    lines = [f"learnt the dependency = final {name} {'>' if higher else '<'} {level:.3g} (halfway from the "
             f"baseline {meta['baseline']:.3g} to a perfect score):"]
    finished = [r for r in rows if math.isfinite(r["final_metric"])]
    learnt = [r for r in finished if (r["final_metric"] > level if higher else r["final_metric"] < level)]
    fewest_learnt = min((r["updates"] for r in learnt), default=None)
    notes = set()
    for spans, what in ((True, f"k2 > d = {d}, a window reaches the input"), (False, f"k2 <= d = {d}, no window does")):
        items = []
        for row in finished:
            if reaches(row, d) != spans:
                continue
            if row in learnt:
                verdict = "learnt" if spans else "learnt, though k2 <= d"
            elif spans:
                verdict = f"not yet, {_plural(row['updates'], 'update')}"
                notes.add("fewer" if fewest_learnt is not None and row["updates"] < fewest_learnt else "later")
            else:
                verdict = "did not"
                notes.add("short")
            items.append(f"{label(row, strategies)} {row['final_metric']:.3g} {verdict}")
        lines.append(f"  {what}: {', '.join(items) or 'none'}")
    if "fewer" in notes:
        lines.append(f"  not yet (fewer updates): its windows reach the input {d} steps back, but it made fewer "
                     "updates in this budget than those that learnt")
    if "later" in notes:
        lines.append(f"  not yet: its windows reach the input {d} steps back, but it had not learnt it at this budget")
    if "short" in notes:
        lines.append("  did not: what it gains over the baseline is not the dependency; its gradient never links an "
                     f"output to the input {d} steps back")
    return lines
