"""``tbptt bench``: time the Trainer against hand-written loops and least-work bounds, in one run."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from ..files import atomic_write_text, check_writable
from .options import add_threads_option, check_threads, using_threads


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark the Trainer against hand-written loops and least-work bounds",
        description="Time TBPTT(k1, k2) training with tbptt.Trainer side by side with a hand-written "
        "detach() loop, the least work each configuration needs, an LSTMCell recipe and (if "
        "installed) Keras, on one LSTM; print one table of ratios (ours / reference) and peak memory.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="preset", action="store_const", const="quick",
                      help="CI-sized run, about 30 s on one CPU thread (default)")
    size.add_argument("--full", dest="preset", action="store_const", const="full",
                      help="the README table: B=32, hidden 256, n=1000 (minutes on a CPU)")
    p.set_defaults(preset="quick")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--out", metavar="FILE", action="append", default=[],
                   help="also write the result to FILE.json (all runs) or FILE.md (the table); repeatable")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per contender (median; preset default)")
    add_threads_option(p)
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="time runs by process CPU time (auto on one CPU thread: robust on a shared "
                   "machine) or wall time (auto on CUDA or several threads)")
    p.add_argument("--memory-n", metavar="N1,N2", default=None,
                   help="stream lengths of the flat-in-n memory rows (default: 500,5000 quick, 1000,10000 full)")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from ..bench import PRESETS

    overrides: dict = {"device": args.device, "clock": args.clock}
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    overrides["threads"] = check_threads(args)
    if args.memory_n is not None:
        try:
            overrides["memory_ns"] = tuple(int(v) for v in args.memory_n.split(","))
        except ValueError:
            raise ValueError(f"--memory-n must be comma-separated ints like 1000,10000; got {args.memory_n!r}")
    return replace(PRESETS[args.preset], **overrides)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..bench import format_markdown, run_suite

    err = Console(stderr=True)
    outs = [Path(name) for name in args.out]
    try:
        for out in outs:
            if out.suffix not in (".json", ".md"):
                raise ValueError(f"--out must end in .json or .md; got {str(out)!r}")
            check_writable(out, "--out")  # before minutes of measuring, not after
        config = _config(args)
        with using_threads(args):
            result = run_suite(config, progress=lambda name: err.print(f"[dim]measuring {name}...[/dim]"))
    except (TypeError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 2
    table = format_markdown(result)
    sys.stdout.write(table)
    for out in outs:
        atomic_write_text(out, json.dumps(result.as_dict(), indent=2) + "\n" if out.suffix == ".json" else table)
        err.print(f"wrote {out}")
    return 0
