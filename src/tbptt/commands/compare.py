"""``tbptt compare``: train a task under several TBPTT configurations and seeds, and report skill,
stability and speed per configuration."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import distributed as tdist
from ..experiments.sweep import compare, summary_line
from ..files import check_writable
from ..validate import positive_int, positive_number
from .console import card, make_console
from .options import (
    add_budget_option,
    add_run_options,
    add_threads_option,
    check_budget,
    check_run_options,
    check_threads,
    load_task,
    print_error,
    task_defaults,
    task_options,
    using_threads,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare TBPTT configurations on a task (skill, stability, speed)",
        description="Train a task under each --config with several seeds, in parallel processes, and "
        "report skill, stability and speed per configuration: tables here, and a report folder "
        "(results.csv/json, PNG plots, report.html). Ctrl-C keeps the runs that finished.",
    )
    add_run_options(p, epochs=None)
    add_budget_option(p)
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    p.add_argument("--config", action="append", required=True, metavar="K1,K2[@KEY=VALUE,...]",
                   help="a configuration, e.g. n,n or 10,40 or 20,20@lr=0.1 or 10,40@model=lru (keys lr, clip, "
                   "strategy, model), artbp:10,30 (random windows, unbiased) or adaptive:10@tolerance=0.05 (k2 "
                   "chosen from the measured gradient decay; keys tolerance, min_k2, max_k2, every); repeatable")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="also stop each run after this many wall-clock seconds (checked between updates)")
    p.add_argument("--target", type=float, default=None,
                   help="validation metric for time-to-target (default: baseline + 90%% of the best improvement)")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes (default: CPU count over --threads; under torchrun, divided among a "
                   "machine's ranks)")
    add_threads_option(p)
    p.add_argument("--out", default=None, help="report folder (default tbptt-report/TASK)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="spread the runs over torchrun's ranks (implied when torchrun's environment is set); "
                   "rank 0 writes the report")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="distributed: seconds a rank waits for the others' runs before the job fails (default 3600)")
    p.set_defaults(func=run, parser=p)


def print_answer(console: Any, comparison: Any) -> None:
    """The answer card, the dependency verdict (when the task's is known) and the Pareto front."""
    answer = comparison.answer
    if answer is None:
        console.print("[red]no configuration finished: no answer[/red]")
        return
    card(console, f"{answer.task}: which TBPTT(k1, k2) at {answer.budget}", answer.lines())
    for line in answer.dependency:
        console.print(line, markup=False, highlight=False)
    if answer.front_lines:
        console.print("Pareto front, skill against CPU seconds of training (mean over seeds): where each "
                      "configuration reached a better validation metric than any other with no more CPU time"
                      + (f" (by more than {answer.front_tolerance:.2g}, the median spread over seeds)"
                         if answer.front_tolerance > 0 else ""), markup=False, highlight=False)
        for line in answer.front_lines:
            console.print(f"  {line}", markup=False, highlight=False)


def print_comparison(console: Any, comparison: Any) -> None:
    """The answer first, then the tables of skill, stability and speed, then what went wrong."""
    print_answer(console, comparison)
    for table in comparison.tables():
        console.print(table)
    failed = [r for r in comparison.runs if r["status"] == "failed"]
    for r in failed:
        console.print(f"[red]run failed[/red] {r['config']} seed {r['seed']}: {r['error']}")
    console.print(summary_line(comparison))
    if comparison.interrupted:
        console.print(f"[yellow]interrupted: {len(comparison.runs)} runs finished and were kept[/yellow]")
    for error in comparison.figure_errors:
        console.print(f"[yellow]figure missing from the report[/yellow] {error}")
    if comparison.report is not None:
        console.print(f"report: {comparison.report}")


def run(args: argparse.Namespace) -> int:
    console = make_console()
    distributed = False
    try:
        check_run_options(args)
        check_threads(args)
        positive_int(args.seeds, "--seeds")
        if args.jobs is not None:
            positive_int(args.jobs, "--jobs", "worker processes")
        positive_number(args.timeout, "--timeout", "seconds")
        options = task_options(args.task, args.task_option)
        check_writable(args.out or f"tbptt-report/{args.task}", "--out", folder=True)
        task = load_task(args.task, args.task_option)  # a missing file is reported here, before any run
        task_defaults(args, task)
        budget = check_budget(args)
        distributed = _join_ranks(args)
        if distributed and torch_rank() != 0:
            console = make_console(quiet=True)
        with using_threads(args):
            comparison = compare(
                args.task, args.config, args.seeds, epochs=args.epochs, budget=budget, strategy=args.strategy,
                hidden=args.hidden, model=args.model, lr=args.lr, optimizer=args.optimizer, clip=args.clip or None,
                segment_length=args.segment_length, max_seconds=args.max_seconds, task_options=options,
                precision=args.precision,
                target=args.target, jobs=args.jobs, out=Path(args.out or f"tbptt-report/{args.task}"),
                progress=not args.no_progress, console=console, distributed=distributed, threads=args.threads,
            )
    except (TypeError, ValueError, OSError, tdist.DistributedError) as exc:
        print_error(exc, args.parser)
        return 2
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    print_comparison(console, comparison)
    if comparison.interrupted:
        return 130
    return 1 if comparison.runs and all(r["status"] == "failed" for r in comparison.runs) else 0


def _join_ranks(args: argparse.Namespace) -> bool:
    """Join torchrun's process group when asked or when its environment is set."""
    if not (getattr(args, "distributed", False) or tdist.in_torchrun_env()):
        return False
    tdist.init_from_env("gloo", timeout=args.timeout)  # the sweep only exchanges results
    return True


def torch_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0
