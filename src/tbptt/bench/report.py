"""A benchmark result as a markdown table."""

from __future__ import annotations

import time
from typing import Optional

from .config import BenchResult


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
        f"{'wall' if c.timer is time.perf_counter else 'process CPU'} time; ratio = ours / reference",
        "",
        "| configuration | reference | ours | reference | ratio | target | met | peak mem ours | peak mem ref | note |",
        "|---|---|---:|---:|---:|---|---|---:|---:|---|",
    ]
    for r in result.rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}" + (" (mem)" if r.metric == "memory" else "")
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(
            f"| {r.configuration} | {r.reference} | {_seconds(r.ours_s)} | {_seconds(r.reference_s)} | {ratio} | "
            f"{r.target.label if r.target else '-'} | {met} | {_bytes(r.ours_bytes)} | {_bytes(r.reference_bytes)} | {r.note} |"
        )
    return "\n".join(lines) + "\n"
