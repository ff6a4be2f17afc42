"""``tbptt compare``: train a task under several TBPTT configurations and seeds, and report skill,
stability and speed per configuration."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from rich.console import Console


def add_run_options(p: argparse.ArgumentParser, epochs: int = 10) -> None:
    """Options shared by the commands that train (compare, probe)."""
    p.add_argument("--task", required=True, help="echo, adding, copy, co2, sunspots or text")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option, e.g. delay=8, steps=200, difference=false or path=book.txt (repeatable)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"epochs per run (default {epochs})")
    p.add_argument("--hidden", type=int, default=32, help="hidden units (default 32)")
    p.add_argument("--cell", choices=("lstm", "gru", "rnn"), default="lstm", help="recurrent cell (default lstm)")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate (default 0.01)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip, 0 for none (default 1)")


def check_run_options(args: argparse.Namespace) -> None:
    """Reject bad values of the options every training command takes (--epochs, --hidden, --lr,
    --clip) before any work starts."""
    for name in ("epochs", "hidden"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive int; got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number; got {args.lr}")
    if not (math.isfinite(args.clip) and args.clip >= 0):
        raise ValueError(f"--clip must be a number >= 0 (0 turns clipping off); got {args.clip}")


def task_options(name: str, items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as the task's options, each read as the type of its default
    (true/false for a boolean)."""
    from ..data import task_options as accepted

    defaults = accepted(name)
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in defaults:
            listed = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
            raise ValueError(f"bad --task-option {item!r}: task {name!r} takes KEY=VALUE with KEY one of: {listed}")
        default = defaults[key]
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"bad --task-option {item!r}: {key} takes true or false")
            options[key] = text.lower() in ("true", "1")
        elif isinstance(default, (int, float)):
            try:
                options[key] = type(default)(text)
            except ValueError:
                raise ValueError(f"bad --task-option {item!r}: {key} takes a{'n' if isinstance(default, int) else ''} "
                                 f"{type(default).__name__}, e.g. {key}={default}") from None
        else:
            options[key] = text
    # a None default is a file the task cannot do without (the text task's corpus)
    if defaults.get("path", "") is None and "path" not in options:
        raise ValueError(f"task {name!r} reads a file: pass --task-option path=FILE")
    return options


def unreadable(exc: OSError) -> ValueError:
    """A task's file that cannot be read, as the error a command prints."""
    return ValueError(f"cannot read {exc.filename or 'the task file'}: {exc.strerror or exc}; "
                      "check --task-option path")


def load_task(name: str, items: list[str]):
    """The task ``name`` with the ``KEY=VALUE`` options of a command line (ValueError on bad ones,
    or on a file that cannot be read)."""
    from ..data import load_task as load

    options = task_options(name, items)
    try:
        return load(name, **options)
    except OSError as exc:
        raise unreadable(exc) from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare TBPTT configurations on a task (skill, stability, speed)",
        description="Train a task under each --config with several seeds, in parallel processes, and "
        "report skill, stability and speed per configuration: tables here, and a report folder "
        "(results.csv/json, PNG plots, report.html). Ctrl-C keeps the runs that finished.",
    )
    add_run_options(p)
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    p.add_argument("--config", action="append", required=True, metavar="K1,K2[@KEY=VALUE,...]",
                   help="a configuration, e.g. n,n or 10,40 or 20,20@lr=0.1 (keys lr, clip, strategy); repeatable")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                   help="adam (default) or plain sgd (no momentum)")
    p.add_argument("--strategy", choices=("recompute", "stored"), default="recompute",
                   help="how windows that overlap earlier updates are run (default recompute)")
    p.add_argument("--segment-length", type=int, default=None,
                   help="steps per train_on call (default: the whole split in one call)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop each run once it has trained this many seconds; the budget is checked between "
                   "train_on calls, so without --segment-length a run stops only at the end of an epoch")
    p.add_argument("--target", type=float, default=None,
                   help="validation metric for time-to-target (default: baseline + 90%% of the best improvement)")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes (default: CPU count; under torchrun, divided among a machine's ranks)")
    p.add_argument("--out", default=None, help="report folder (default tbptt-report/TASK)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="spread the runs over torchrun's ranks (implied when torchrun's environment is set); "
                   "rank 0 writes the report")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="distributed: seconds a rank waits for the others' runs before the job fails (default 3600)")
    p.set_defaults(func=run)


def print_comparison(console: Console, comparison) -> None:
    from ..experiments.sweep import summary_line

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
    from .. import distributed as tdist
    from ..experiments.sweep import compare

    console = Console()
    distributed = False
    try:
        check_run_options(args)
        if not (math.isfinite(args.timeout) and args.timeout > 0):
            raise ValueError(f"--timeout must be a positive number of seconds; got {args.timeout}")
        options = task_options(args.task, args.task_option)
        load_task(args.task, args.task_option)  # a missing file is reported here, before any run
        distributed = _join_ranks(args)
        if distributed and torch_rank() != 0:
            console = Console(quiet=True)
        comparison = compare(
            args.task, args.config, args.seeds, epochs=args.epochs, strategy=args.strategy,
            hidden=args.hidden, cell=args.cell, lr=args.lr, optimizer=args.optimizer, clip=args.clip or None,
            segment_length=args.segment_length, max_seconds=args.max_seconds, task_options=options,
            target=args.target, jobs=args.jobs, out=Path(args.out or f"tbptt-report/{args.task}"),
            progress=not args.no_progress, console=console, distributed=distributed,
        )
    except (TypeError, ValueError, OSError, tdist.DistributedError) as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
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
    from .. import distributed as tdist

    if not (getattr(args, "distributed", False) or tdist.in_torchrun_env()):
        return False
    tdist.init_from_env("gloo", timeout=args.timeout)  # the sweep only exchanges results
    return True


def torch_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0
