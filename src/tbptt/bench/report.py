"""A benchmark result as a markdown table."""

from __future__ import annotations

import time
from typing import Optional

from .config import GRID_PAIRS, BenchResult, Row


def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _bytes(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:.2f} MiB"


def format_markdown(result: BenchResult) -> str:
    """The table as GitHub markdown, headed by the machine and sizes it ran with."""
    c, m = result.config, result.machine
    lines = [
        f"Machine: {m['processor']}, {m['platform']}, torch {m['torch']}, {c.threads} thread(s), "
        f"device {m['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}",
        f"Model: nn.LSTM({c.inputs}, {c.hidden}) + Linear({c.hidden}, {c.outputs}), B={c.batch}, SGD; "
        f"median of {c.repeats} runs after {c.warmup} warm-up, "
        f"{'wall' if c.timer is time.perf_counter else 'process CPU'} time; ratio = ours / reference "
        "(in brackets: the lowest and highest ratio of runs made side by side; \"noisy\": that spread "
        "straddles the target, so this run cannot tell)",
        "",
        "| configuration | reference | ours | reference | ratio | target | met | peak mem ours | peak mem ref | note |",
        "|---|---|---:|---:|---:|---|---|---:|---:|---|",
    ]
    for r in [r for r in result.rows if r.group == "main"]:
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}" + (" (mem)" if r.metric == "memory" else "")
        if r.spread is not None and r.metric == "time":
            ratio += f" ({r.spread[0]:.2f}-{r.spread[1]:.2f})"
        met = {None: "-", "yes": "yes", "no": "**no**", "noisy": "noisy"}[r.verdict]
        lines.append(
            f"| {r.configuration} | {r.reference} | {_seconds(r.ours_s)} | {_seconds(r.reference_s)} | {ratio} | "
            f"{r.target.label if r.target else '-'} | {met} | {_bytes(r.ours_bytes)} | {_bytes(r.reference_bytes)} | {r.note} |"
        )
    return "\n".join(lines + _grid(result)) + "\n"


def _ratio(row: Row) -> str:
    text = f"{row.ratio:.3f}" if row.ratio is not None else "-"
    if row.spread is not None:
        text += f" ({row.spread[0]:.2f}-{row.spread[1]:.2f})"
    return text + {None: "", "yes": "", "no": " **no**", "noisy": " noisy"}[row.verdict]


def _grid(result: BenchResult) -> list[str]:
    """The strategy grid as its own table: one line per configuration, one column per comparison."""
    grid = [r for r in result.rows if r.group == "grid"]
    if not grid:
        return []
    columns = [f"{ours} / {theirs}" + (f" ({target.label})" if target else "") for ours, theirs, target in GRID_PAIRS]
    lines = ["", "Strategies over the grid (each ratio with its target; **no** = missed, noisy = the spread "
             "straddles the target; the floor: the backward calls a fused model makes under `stored`):", "",
             "| configuration | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    by_name: dict[str, list[Row]] = {}
    for r in grid:
        by_name.setdefault(r.configuration.rsplit(": ", 1)[0], []).append(r)
    for name, rows in by_name.items():
        lines.append(f"| {name} | " + " | ".join(_ratio(r) for r in rows) + " |")
    return lines
