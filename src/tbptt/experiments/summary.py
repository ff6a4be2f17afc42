"""Per-configuration summaries of a sweep's runs: skill, stability and speed.

A run is the JSON-able dict ``tbptt.experiments.runs.run_one`` returns (one configuration, one
seed). Runs are grouped by (configuration, strategy); each group becomes one row.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional, Sequence

Run = dict[str, Any]
Row = dict[str, Any]

TARGET_SHARE = 0.9
"""Default target: the baseline plus this share of the best improvement any run achieved."""


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _mean(values) -> float:
    finite = _finite(values)
    return statistics.fmean(finite) if finite else math.nan


def _std(values) -> float:
    finite = _finite(values)
    return statistics.stdev(finite) if len(finite) >= 2 else (0.0 if finite else math.nan)


def better(a: float, b: float, higher_is_better: bool) -> bool:
    """Whether metric ``a`` is at least as good as ``b``."""
    return a >= b if higher_is_better else a <= b


def default_target(runs: Sequence[Run], baseline: float, higher_is_better: bool) -> Optional[float]:
    """The baseline plus ``TARGET_SHARE`` of the way to the best metric any run reached; None if no
    run beat the baseline."""
    bests = _finite(r.get("best_metric") for r in runs if r.get("status") != "failed")
    if not bests or not math.isfinite(baseline):
        return None
    best = max(bests) if higher_is_better else min(bests)
    if best == baseline or not better(best, baseline, higher_is_better):
        return None
    return baseline + TARGET_SHARE * (best - baseline)


def time_to_target(run: Run, target: Optional[float], higher_is_better: bool) -> Optional[float]:
    """CPU seconds of the run (one thread; training and validation) until the end of the first
    epoch whose validation metric reached ``target``; None if it never did."""
    if target is None:
        return None
    for epoch in run.get("epochs", []):
        metric = epoch.get("valid_metric")
        if metric is not None and math.isfinite(metric) and better(metric, target, higher_is_better):
            return float(epoch["cpu_elapsed"])
    return None


def label(run_or_row: dict, strategies: int) -> str:
    """A configuration's name, with its strategy when the sweep has more than one (and the name does
    not say it already, as ``"TBPTT(1,50) strategy=stored"`` does)."""
    config = run_or_row["config"]
    if strategies <= 1 or "strategy=" in config:
        return config
    return f"{config} {run_or_row['strategy']}"


def group_runs(runs: Sequence[Run]) -> dict[tuple[str, str], list[Run]]:
    """Runs by (configuration, strategy), in the order the configurations first appear."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r["config"], r["strategy"]), []).append(r)
    return groups


def summarize(
    runs: Sequence[Run], baseline: float, higher_is_better: bool, target: Optional[float] = None
) -> tuple[list[Row], Optional[float]]:
    """One row per (configuration, strategy), and the target metric used for time-to-target.

    Skill and stability are averaged over the runs that finished (failed runs only count in
    ``failed``); ``diverged`` counts runs that met a non-finite loss.
    """
    if target is None:
        target = default_target(runs, baseline, higher_is_better)
    rows: list[Row] = []
    for (config, strategy), group in group_runs(runs).items():
        done = [r for r in group if r.get("status") != "failed"]
        finals = [r.get("final_metric") for r in done]
        times = [time_to_target(r, target, higher_is_better) for r in done]
        reached = [t for t in times if t is not None]
        norms_max = _finite(r.get("grad_norm_max") for r in done)
        rows.append({
            "config": config,
            "strategy": strategy,
            "k1": group[0].get("k1"),
            "k2": group[0].get("k2"),
            "windows": group[0].get("windows", "fixed"),  # ARTBP's are random, AdaptiveTBPTT's chosen
            "runs": len(group),
            "failed": sum(r.get("status") == "failed" for r in group),
            "diverged": sum(r.get("status") == "diverged" for r in group),
            "final_metric": _mean(finals),
            "final_metric_std": _std(finals),
            "best_metric": _mean(r.get("best_metric") for r in done),
            "baseline": baseline,
            "beats_baseline": sum(
                1 for v in _finite(finals) if better(v, baseline, higher_is_better) and v != baseline
            ),
            "grad_norm_median": _mean(r.get("grad_norm_median") for r in done),
            "grad_norm_max": max(norms_max) if norms_max else math.nan,
            "grad_spikes": _mean(r.get("grad_spikes") for r in done),
            "roughness": _mean(r.get("roughness") for r in done),
            "wall_time": _mean(r.get("wall_time") for r in done),
            "cpu_time": _mean(r.get("cpu_time") for r in done),
            "train_cpu": _mean(r.get("train_cpu") for r in done),
            "steps_per_s": _mean(r.get("steps_per_s") for r in done),
            "updates": _mean(r.get("updates") for r in done),
            "forward_steps": _mean(r.get("forward_steps") for r in done),
            "backward_steps": _mean(r.get("backward_steps") for r in done),
            "peak_graph_mb": _mean(r.get("peak_graph_mb") for r in done),
            "mean_k2": _mean(r.get("mean_k2") for r in done),
            "measure_time": _mean(r.get("measure_time") for r in done),
            "time_to_target": _mean(reached),
            "reached_target": len(reached),
        })
    return rows, target
