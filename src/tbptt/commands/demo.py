"""``tbptt demo``: the canonical TBPTT(k1, k2) configurations compared on a delayed echo and on CO2,
at an equal CPU budget per run: the practitioner's question is which configuration to use for the
compute they have, not for a number of epochs.

Sizes are chosen to finish in about a minute on two CPU cores. The echo task's delay d is known,
so the demo shows the central fact of truncation: a window of k2 <= d steps cannot carry the error
back to the input it needs, and k2 > d can (given enough updates).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..budget import Budget
from ..experiments.page import write_index
from ..experiments.runs import Configuration
from ..experiments.sweep import compare
from ..files import check_writable
from ..validate import positive_int
from .compare import print_comparison
from .console import heading, make_console
from .options import add_precision_option, add_threads_option, check_threads, print_error, using_threads

DELAY = 5


@dataclass(frozen=True)
class DemoPart:
    """One comparison of the demo: a task, its options and the configurations to run."""

    task: str
    configs: tuple[str, ...]
    budget: str
    task_options: dict[str, Any] = field(default_factory=dict)
    note: str = ""


PARTS = (
    DemoPart(
        "echo",
        # (n,n) full BPTT; (1,n) real-time BPTT on a short stream; (k,k) chunks with k = d and k = 2d;
        # k1 < k2 overlapping windows; k1 > k2; (k1,1) one step of context
        ("n,n", "1,n", f"{DELAY},{DELAY}", f"{2 * DELAY},{2 * DELAY}", "4,12", "12,4", "4,1"),
        budget="cpu:2.5",
        task_options=dict(delay=DELAY, symbols=8, batch_size=128, steps=50, eval_steps=50),
        note=f"delayed echo, delay d = {DELAY}: to learn it, an error must flow back d steps, so k2 > d",
    ),
    DemoPart(
        "co2",
        ("n,n", "1,n", "10,10", "5,20", "20,5", "5,1"),
        budget="cpu:1.5",
        task_options=dict(batch_size=16),
        note="weekly Mauna Loa CO2, one week ahead, in 16 streams of 100 weeks; RMSE in ppm against persistence",
    ),
)
QUICK = (
    DemoPart("echo", ("3,3", "2,6"), budget="epochs:2",
             task_options=dict(delay=2, batch_size=8, steps=20, eval_steps=20)),
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="which TBPTT(k1, k2)? the canonical configurations on a delayed echo and on CO2 (about a minute)",
        description="Compare TBPTT(n,n), (1,n), (k,k), (k1<k2), (k1>k2) and (k1,1) on a delayed echo task "
        "and on CO2 at an equal CPU budget per run, answer which to use and why, and write a report "
        "(index.html). Takes about a minute on two CPU cores.",
    )
    p.add_argument("--out", default="tbptt-demo", help="report folder (default tbptt-demo)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per configuration (default 2)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU count over --threads)")
    add_threads_option(p)
    p.add_argument("--budget", default=None, metavar="KIND:AMOUNT",
                   help="what each run may spend, for both tasks: epochs:N, cpu:SECONDS or backward:STEPS "
                   f"(default: {', '.join(f'{part.budget} for {part.task}' for part in PARTS)})")
    p.add_argument("--quick", action="store_true", help="a tiny run that checks the demo works (seconds)")
    p.add_argument("--config", action="append", default=[], metavar="CONFIG",
                   help="also run this configuration on each task, e.g. artbp:10,30 or adaptive:4@tolerance=0.05 "
                   "(repeatable)")
    add_precision_option(p)
    p.set_defaults(func=run, parser=p)


def _part_budget(part: DemoPart, budget: Optional[str]) -> str:
    return budget or part.budget


def _index(out: Path, done: list[tuple[DemoPart, Any]], seconds: float) -> Path:
    parts = [{"name": f"{part.task}: {part.note}" if part.note else part.task, "note": c.meta.get("description", ""),
              "answer": c.answer, "meta": c.meta, "report": c.report,
              "front": next((f for f in c.files if f.name == "front.png"), None)} for part, c in done]
    intro = ("The canonical TBPTT(k1, k2) configurations, each trained for the same budget on two tasks, "
             f"{len(done[0][1].meta.get('settings', {}).get('seeds', []))} seeds each; finished in {seconds:.0f} s. "
             "For each task: the configuration to use at that budget and why, then the Pareto front of skill "
             "against CPU time (the answer at smaller budgets). Each full report has the tables and every curve.")
    return write_index(out, "tbptt demo: which TBPTT(k1, k2)?", intro, parts)


def run(args: argparse.Namespace) -> int:
    try:
        positive_int(args.seeds, "--seeds")
        check_threads(args)
        if args.jobs is not None:
            positive_int(args.jobs, "--jobs", "worker processes")
        if args.budget is not None:
            args.budget = str(Budget.parse(args.budget, "--budget"))
        for text in args.config:
            Configuration.parse(text)
        check_writable(args.out, "--out", folder=True)
    except ValueError as exc:
        print_error(exc, args.parser)
        return 2
    console = make_console()
    out = Path(args.out)
    started = time.perf_counter()
    done: list[tuple[DemoPart, Any]] = []
    for part in QUICK if args.quick else PARTS:
        heading(console, f"{part.task}: {part.note}" if part.note else part.task)
        try:
            with using_threads(args):
                comparison = compare(part.task, list(part.configs) + list(args.config), args.seeds,
                                     budget=_part_budget(part, args.budget), task_options=part.task_options,
                                     jobs=args.jobs, out=out / part.task, console=console, threads=args.threads,
                                     precision=args.precision)
        except ValueError as exc:  # a precision the task's model cannot run at
            print_error(exc, args.parser)
            return 2
        print_comparison(console, comparison)
        if comparison.report is not None:
            done.append((part, comparison))
        if comparison.interrupted:
            console.print("[yellow]demo interrupted[/yellow]")
            return 130
    seconds = time.perf_counter() - started
    index = _index(out, done, seconds) if done else None
    console.print(f"demo finished in {seconds:.0f} s; open {index} (reports: "
                  + ", ".join(str(c.report) for _, c in done) + ")", markup=False, highlight=False)
    return 0
