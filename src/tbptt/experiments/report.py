"""A sweep's report: terminal tables (rich), results.csv/json, runs.csv and a self-contained report.html.

``meta`` describes the sweep: task, description, metric_name, higher_is_better, baseline,
baseline_name, target, interrupted, and the settings the runs used.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

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
    ("wall s", "wall_time", "s"),
    ("cpu s", "cpu_time", "s"),
    ("steps/s", "steps_per_s", "int"),
    ("updates", "updates", "int"),
    ("fwd steps", "forward_steps", "int"),
    ("bwd steps", "backward_steps", "int"),
    ("mean k2", "mean_k2", "g3"),
    ("graph MB", "peak_graph_mb", "mb"),
]
GROUPS = {"skill": SKILL, "stability": STABILITY, "speed": SPEED}

NOTES = {
    "beats baseline": "runs whose final validation metric is better than the trivial baseline",
    "CPU s to target": "CPU seconds of the run (one thread; training and validation) until the end of the "
    "first epoch whose validation metric reached the target (default: baseline + 90% of the best "
    "improvement any run achieved); mean over the runs that got there, with how many did",
    "grad median": "each run's median gradient norm (before clipping), averaged over seeds",
    "grad max": "the largest gradient norm (before clipping) of any update of any seed",
    "spikes": "updates whose gradient norm exceeds 10x their run's median; mean over seeds",
    "roughness": "how much the validation loss goes up and down from epoch to epoch: mean |change of "
    "log loss| beyond its net change (0 for a curve that only falls); mean over seeds. Measured on "
    "validation, which every configuration computes alike (training losses per update are not comparable: "
    "one step's error for TBPTT(1,n), a stream's mean for TBPTT(n,n))",
    "mean k2": "the mean window of the updates: k2 for TBPTT (blank for n), the mean L drawn for ARTBP, the "
    "mean k2 in force for AdaptiveTBPTT (whose measurements' CPU seconds are in results.csv, measure_time)",
    "cpu s": "CPU seconds of the run's process (one thread): steadier than wall time on a busy machine",
    "steps/s": "stream steps (positions along the time axis, each covering every stream of the batch) "
    "trained per second spent in updates",
    "graph MB": "peak memory held by autograd graphs (tensors saved for backward)",
}


def _g(value: Any, digits: int = 4) -> str:
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
        return f"{_g(value)} ± {_g(row.get(key + '_std'), 2)}" if runs > 1 else _g(value)
    if kind == "of_runs":
        return f"{value}/{runs}"
    if kind == "int":
        return "-" if value is None or not math.isfinite(value) else f"{value:,.0f}"
    if kind == "s":
        return "-" if value is None or not math.isfinite(value) else f"{value:.1f}"
    if kind == "g3":
        return _g(value, 3)
    if kind == "mb":
        return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"
    if kind == "reach":
        reached = row.get("reached_target", 0)
        if not reached:
            return f"never 0/{runs}"
        return f"{value:.1f} {reached}/{runs}"
    return _g(value)


def _columns(group: str, meta: dict) -> list[tuple[str, str, str]]:
    return [(title.format(metric=meta.get("metric_name", "metric")), key, kind) for title, key, kind in GROUPS[group]]


def terminal_tables(rows: Sequence[Row], meta: dict) -> list[Any]:
    """Three rich tables (skill, stability, speed), one row per configuration."""
    from rich.table import Table

    strategies = len({r["strategy"] for r in rows})
    direction = "higher" if meta.get("higher_is_better") else "lower"
    captions = {
        "skill": f"validation {meta.get('metric_name')} ({direction} is better); baseline "
        f"({meta.get('baseline_name', 'trivial')}) = {_g(meta.get('baseline'))}; mean ± sd over seeds; "
        f"target {_g(meta.get('target'))} (CPU s to reach it: mean over the runs that did)",
        "stability": "gradient norms before clipping; grad median, spikes (> 10x the run's median) and "
        "roughness (of the validation loss per epoch): means over seeds; grad max: max over seeds",
        "speed": "means over seeds; steps/s: stream steps (each covering all streams of the batch) per "
        "second of updates; graph MB: peak memory held by autograd graphs",
    }
    tables = []
    for group in GROUPS:
        table = Table(title=f"{meta.get('task', '')}: {group}", caption=captions[group], title_justify="left")
        table.add_column("configuration", no_wrap=True)
        for title, _, _ in _columns(group, meta):
            table.add_column(title, justify="right")
        for row in rows:
            style = "red" if row.get("diverged") or row.get("failed") else None
            table.add_row(label(row, strategies), *[cell(row, k, kind) for _, k, kind in _columns(group, meta)],
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


def _html_table(rows: Sequence[Row], meta: dict) -> str:
    strategies = len({r["strategy"] for r in rows})
    head = ["configuration"]
    for group in GROUPS:
        head += [title for title, _, _ in _columns(group, meta)]
    parts = ["<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        cells = [label(row, strategies)]
        for group in GROUPS:
            cells += [cell(row, k, kind) for _, k, kind in _columns(group, meta)]
        bad = ' class="bad"' if row.get("diverged") or row.get("failed") else ""
        parts.append(f"<tr{bad}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def write_html(out: Path, meta: dict, rows: Sequence[Row], images: Sequence[tuple[str, Optional[Path]]],
               title: Optional[str] = None, headline: str = "") -> Path:
    """report.html with the table and every image embedded (base64): one file to open or send; an
    image whose path is None is a figure that could not be drawn, and its caption says why.
    ``headline``: a sentence printed above the table (which configuration to use)."""
    title = title or f"tbptt compare: {meta.get('task', '')}"
    figures = []
    for caption, path in images:
        if path is None:  # a figure that could not be drawn: say so where it would have been
            figures.append(f"<p class='bad'>Figure missing: {html.escape(caption)}</p>")
            continue
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        figures.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    notes = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in NOTES.items())
    settings = ", ".join(f"{k}={v}" for k, v in meta.get("settings", {}).items())
    interrupted = "<p class='bad'>Interrupted: only the runs that finished are shown.</p>" if meta.get("interrupted") else ""
    direction = "higher" if meta.get("higher_is_better") else "lower"
    text = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
td:first-child{{text-align:left}}.bad{{color:#b00}}img{{max-width:100%}}figure{{margin:1.5em 0}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{html.escape(meta.get('description', ''))}</p>
<p>Metric: validation {html.escape(str(meta.get('metric_name')))} ({direction} is better).
Baseline ({html.escape(str(meta.get('baseline_name', 'trivial')))}): {_g(meta.get('baseline'))}.
Target for time-to-target: {_g(meta.get('target'))}.</p>
<p>Settings: {html.escape(settings)}</p>{interrupted}
<p><b>{html.escape(headline)}</b></p>
{_html_table(rows, meta)}
<ul>{notes}</ul>
{''.join(figures)}
</body></html>
"""
    path = out / "report.html"
    atomic_write_text(path, text)
    return path
