"""A sweep's tables and files: terminal tables (rich), results.csv/json and runs.csv (report.html is
``page.py``'s).

``meta`` describes the sweep: task, description, metric_name, higher_is_better, baseline,
baseline_name, target, interrupted, and the settings the runs used.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from ..files import atomic_write_text
from .summary import Row, Run, label

# (column title, row key, how to print it); the three groups answer the three questions
SKILL = [
    ("final {metric}", "final_metric", "pm"),
    ("best", "best_metric", "g"),
    ("beats baseline", "beats_baseline", "of_runs"),
    ("CPU s to target", "time_to_target", "reach"),
]
STABILITY = [
    ("diverged", "diverged", "of_runs"),
    ("grad median", "grad_norm_median", "g3"),
    ("grad max", "grad_norm_max", "g3"),
    ("spikes", "grad_spikes", "g3"),
    ("roughness", "roughness", "g3"),
]
SPEED = [
    ("train CPU s", "train_cpu", "s"),
    ("CPU s", "cpu_time", "s"),
    ("steps/s", "steps_per_s", "int"),
    ("updates", "updates", "int"),
    ("fwd steps", "forward_steps", "int"),
    ("bwd steps", "backward_steps", "int"),
    ("mean k2", "mean_k2", "g3"),
    ("graph MB", "peak_graph_mb", "mb"),
]
GROUPS = {"skill": SKILL, "stability": STABILITY, "speed": SPEED}

# what each column means, by row key (the HTML report prints them under each table)
NOTES = {
    "final_metric": "validation metric at the end of the run, mean ± standard deviation over seeds",
    "best_metric": "the best validation metric of any epoch, mean over seeds",
    "beats_baseline": "runs whose final validation metric is better than the trivial baseline",
    "time_to_target": "CPU seconds of the run (one thread; training and validation) until the end of the "
    "first epoch whose validation metric reached the target (default: baseline + 90% of the best "
    "improvement any run achieved); mean over the runs that got there, with how many did",
    "diverged": "runs that met a non-finite loss",
    "grad_norm_median": "each run's median gradient norm (before clipping), averaged over seeds",
    "grad_norm_max": "the largest gradient norm (before clipping) of any update of any seed",
    "grad_spikes": "updates whose gradient norm exceeds 10x their run's median; mean over seeds",
    "roughness": "how much the validation loss goes up and down from epoch to epoch: mean |change of "
    "log loss| beyond its net change (0 for a curve that only falls); mean over seeds. Measured on "
    "validation, which every configuration computes alike (training losses per update are not comparable: "
    "one step's error for TBPTT(1,n), a stream's mean for TBPTT(n,n))",
    "mean_k2": "the mean window of the updates: k2 for TBPTT (blank for n), the mean L drawn for ARTBP, the "
    "mean k2 in force for AdaptiveTBPTT (whose measurements' CPU seconds are in results.csv, measure_time)",
    "train_cpu": "CPU seconds spent training (forward, backward, optimizer; validation not counted): what a "
    "CPU budget counts; mean over seeds",
    "cpu_time": "CPU seconds of the whole run, validation included (one thread: steadier than wall time on a "
    "busy machine); mean over seeds",
    "steps_per_s": "stream steps (positions along the time axis, each covering every stream of the batch) "
    "trained per second spent in updates",
    "updates": "optimizer steps made, mean over seeds",
    "forward_steps": "steps run forward, recomputed windows counted each time; mean over seeds",
    "backward_steps": "steps backpropagated through, over all updates: the gradient cost; mean over seeds",
    "peak_graph_mb": "peak memory held by autograd graphs (tensors saved for backward)",
}


def number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    value = float(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.2e}"
    return f"{value:.{digits}g}"


def cell(row: Row, key: str, kind: str) -> str:
    """The text of one table cell."""
    value = row.get(key)
    runs = row.get("runs", 0) - row.get("failed", 0)
    if kind == "pm":
        return f"{number(value)} ± {number(row.get(key + '_std'), 2)}" if runs > 1 else number(value)
    if kind == "of_runs":
        return f"{value}/{runs}"
    if kind == "int":
        return "-" if value is None or not math.isfinite(value) else f"{value:,.0f}"
    if kind == "s":
        return "-" if value is None or not math.isfinite(value) else f"{value:.3g}" if value < 1 else f"{value:.1f}"
    if kind == "g3":
        return number(value, 3)
    if kind == "mb":
        return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"
    if kind == "reach":
        reached = row.get("reached_target", 0)
        if not reached:
            return f"never 0/{runs}"
        return f"{value:.1f} {reached}/{runs}"
    return number(value)


def columns(group: str, meta: dict) -> list[tuple[str, str, str]]:
    return [(title.format(metric=meta.get("metric_name", "metric")), key, kind) for title, key, kind in GROUPS[group]]


def terminal_tables(rows: Sequence[Row], meta: dict) -> list[Any]:
    """Three rich tables (skill, stability, speed), one row per configuration."""
    from rich.table import Table

    strategies = len({r["strategy"] for r in rows})
    direction = "higher" if meta.get("higher_is_better") else "lower"
    captions = {
        "skill": f"validation {meta.get('metric_name')} ({direction} is better); baseline "
        f"({meta.get('baseline_name', 'trivial')}) = {number(meta.get('baseline'))}; mean ± sd over seeds; "
        f"target {number(meta.get('target'))} (CPU s to reach it: mean over the runs that did)",
        "stability": "gradient norms before clipping; grad median, spikes (> 10x the run's median) and "
        "roughness (of the validation loss per epoch): means over seeds; grad max: max over seeds",
        "speed": "means over seeds; train CPU s: CPU seconds of training (what a cpu budget counts), CPU s: of "
        "the whole run; steps/s: stream steps (each covering all streams of the batch) per second of updates; "
        "graph MB: peak memory held by autograd graphs",
    }
    tables = []
    for group in GROUPS:
        table = Table(title=f"{meta.get('task', '')}: {group}", caption=captions[group], title_justify="left")
        table.add_column("configuration", no_wrap=True)
        for title, _, _ in columns(group, meta):
            table.add_column(title, justify="right")
        for row in rows:
            style = "red" if row.get("diverged") or row.get("failed") else None
            table.add_row(label(row, strategies), *[cell(row, k, kind) for _, k, kind in columns(group, meta)],
                          style=style)
        tables.append(table)
    return tables


def _flat(run: Run) -> dict[str, Any]:
    return {k: v for k, v in run.items() if not isinstance(v, (list, dict))}


def _csv_text(records: Sequence[dict]) -> str:
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def _json_safe(value: Any) -> Any:
    # JSON has no NaN or infinity; null keeps the file readable by every parser
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(out: Path, meta: dict, rows: Sequence[Row], runs: Sequence[Run]) -> None:
    """results.json (meta, one row per configuration, every run), results.csv (the rows) and
    runs.csv (one line per run); each written whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "summary": list(rows), "runs": list(runs)}
    atomic_write_text(out / "results.json", json.dumps(_json_safe(payload), indent=1))
    for name, records in (("results.csv", rows), ("runs.csv", [_flat(r) for r in runs])):
        atomic_write_text(out / name, _csv_text(records))
