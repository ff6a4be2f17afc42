"""``tbptt demo``: the canonical TBPTT(k1, k2) configurations compared on a delayed echo and on CO2.

Sizes are chosen to finish in about a minute on two CPU cores. The echo task's delay d is known,
so the demo shows the central fact of truncation: a window of k2 <= d steps cannot carry the error
back to the input it needs, and k2 > d can (given enough updates).
"""

from __future__ import annotations

import argparse
import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..experiments.runs import Configuration
from ..files import atomic_write_text, check_writable
from ..experiments.sweep import compare
from ..validate import positive_int
from .compare import print_comparison
from .options import print_error

DELAY = 5


@dataclass(frozen=True)
class DemoPart:
    """One comparison of the demo: a task, its options and the configurations to run."""

    task: str
    configs: tuple[str, ...]
    epochs: int
    task_options: dict[str, Any] = field(default_factory=dict)
    note: str = ""


PARTS = (
    DemoPart(
        "echo",
        # (n,n) full BPTT; (1,n) real-time BPTT on a short stream; (k,k) chunks with k = d and k = 2d;
        # k1 < k2 overlapping windows; k1 > k2; (k1,1) one step of context
        ("n,n", "1,n", f"{DELAY},{DELAY}", f"{2 * DELAY},{2 * DELAY}", "4,12", "12,4", "4,1"),
        epochs=30,
        task_options=dict(delay=DELAY, symbols=8, batch_size=128, steps=50, eval_steps=100),
        note=f"delayed echo, delay d = {DELAY}: to learn it, an error must flow back d steps, so k2 > d",
    ),
    DemoPart(
        "co2",
        ("n,n", "1,n", "10,10", "5,20", "20,5", "5,1"),
        epochs=10,
        task_options=dict(batch_size=16),
        note="weekly Mauna Loa CO2, one week ahead, in 16 streams of 100 weeks; RMSE in ppm against persistence",
    ),
)
QUICK = (
    DemoPart("echo", ("3,3", "2,6"), epochs=2, task_options=dict(delay=2, batch_size=8, steps=20, eval_steps=20)),
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="compare the canonical configurations on a delayed echo and on CO2 (about a minute)",
        description="Compare TBPTT(n,n), (1,n), (k,k), (k1<k2), (k1>k2) and (k1,1) on a delayed echo task "
        "and on CO2 and write a report. Takes about a minute on two CPU cores.",
    )
    p.add_argument("--out", default="tbptt-demo", help="report folder (default tbptt-demo)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per configuration (default 2)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    p.add_argument("--quick", action="store_true", help="a tiny run that checks the demo works (seconds)")
    p.add_argument("--config", action="append", default=[], metavar="CONFIG",
                   help="also run this configuration on each task, e.g. artbp:10,30 or adaptive:4@tolerance=0.05 "
                   "(repeatable)")
    p.set_defaults(func=run, parser=p)


LEARNT = 0.5
"""Final echo accuracy above which a configuration counts as having learnt the delay (chance is
1/symbols, 0.128 in the demo): beating chance alone does not show it."""


def echo_verdict(rows: list[dict], delay: int, chance: float) -> list[str]:
    """Which configurations learnt the delay (final accuracy > ``LEARNT``), those whose k2 exceeds
    the delay apart from those whose k2 does not, from the comparison's rows."""

    lines = [f"learnt the delay = final accuracy > {LEARNT:g} (chance {chance:.3f}):"]
    notes = set()
    for spans, name in ((True, f"k2 > d = {delay}, a window reaches the input"),
                        (False, f"k2 <= d = {delay}, no window reaches it")):
        items = []
        for row in rows:
            k2 = _longest_window(Configuration.parse(row["config"].split()[0]).schedule)
            metric = row["final_metric"]
            if (k2 is None or k2 > delay) != spans or not math.isfinite(metric):
                continue
            if metric > LEARNT:
                verdict = "learnt" if spans else "learnt, though k2 <= d"
            elif spans:
                verdict = f"not yet, only {row['updates']:.0f} updates"
                notes.add("few")
            else:
                verdict = "did not"
                notes.add("short")
            items.append(f"{row['config']} {metric:.3f} {verdict}")
        lines.append(f"  {name}: {', '.join(items) or 'none'}")
    if "few" in notes:
        lines.append(f"  not yet: its windows reach the input {delay} steps back, but it made fewer updates in "
                     "the same epochs than those that learnt")
    if "short" in notes:
        lines.append("  did not: what it gains over chance is not the echo; its gradient never links an "
                     f"output to the input {delay} steps back")
    return lines


def _longest_window(schedule: Any) -> Any:
    """The longest window a schedule can give an update (None: unbounded): TBPTT's k2, AdaptiveTBPTT's
    max_k2, ARTBP's none (a window may reach any step)."""
    return getattr(schedule, "max_k2", getattr(schedule, "k2", None))


def _index(out: Path, reports: list[tuple[DemoPart, Path]], seconds: float) -> Path:
    links = "".join(
        f'<li><a href="{html.escape(str(path.relative_to(out)))}">{html.escape(part.task)}</a>: '
        f"{html.escape(part.note)}</li>" for part, path in reports
    )
    path = out / "index.html"
    atomic_write_text(path, f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>tbptt demo</title></head><body>"
                    f"<h1>tbptt demo</h1><p>Finished in {seconds:.0f} s.</p><ul>{links}</ul></body></html>\n")
    return path


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    try:
        positive_int(args.seeds, "--seeds")
        if args.jobs is not None:
            positive_int(args.jobs, "--jobs", "worker processes")
        for text in args.config:
            Configuration.parse(text)
        check_writable(args.out, "--out", folder=True)
    except ValueError as exc:
        print_error(exc, args.parser)
        return 2
    console = Console()
    out = Path(args.out)
    started = time.perf_counter()
    reports: list[tuple[DemoPart, Path]] = []
    parts = QUICK if args.quick else PARTS
    for part in parts:
        console.rule(f"{part.task}: {part.note}" if part.note else part.task)
        comparison = compare(part.task, list(part.configs) + list(args.config), args.seeds, epochs=part.epochs,
                             task_options=part.task_options, jobs=args.jobs, out=out / part.task, console=console)
        print_comparison(console, comparison)
        if part.task == "echo" and comparison.rows:
            for line in echo_verdict(comparison.rows, part.task_options.get("delay", DELAY), comparison.meta["baseline"]):
                console.print(line)
        if comparison.report is not None:
            reports.append((part, comparison.report))
        if comparison.interrupted:
            console.print("[yellow]demo interrupted[/yellow]")
            return 130
    seconds = time.perf_counter() - started
    index = _index(out, reports, seconds)
    console.print(f"demo finished in {seconds:.0f} s; open {index} (reports: "
                  + ", ".join(str(p) for _, p in reports) + ")")
    return 0
