"""``tbptt schedule K1 K2 --n N``: draw which steps each update covers, and what it costs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..experiments.timeline import cost_table, plot_schedule, render_timeline
from ..files import check_writable
from ..schedule import TBPTT
from ..validate import positive_int
from .options import print_error


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "schedule",
        help="draw a TBPTT(k1, k2) schedule and its cost",
        description="Draw which steps each update of TBPTT(K1, K2) runs forward, backpropagates "
        "through and injects errors from, on a stream of N steps, with the cost in steps. "
        "The schedule is given as K1 K2 or as K1,K2.",
    )
    p.add_argument("k1", help="steps between updates (an int, or n for the whole stream); or K1,K2")
    p.add_argument("k2", nargs="?", default=None, help="steps backpropagated per update (an int, or n)")
    p.add_argument("--n", type=int, default=20, help="stream length (default 20)")
    p.add_argument("--errors", choices=("new", "window"), default="new",
                   help="inject each error once (new, default) or every error of the window")
    p.add_argument("--png", metavar="FILE", help="also write the drawing as a PNG (folders are created)")
    p.add_argument("--width", type=int, default=None,
                   help="terminal columns for the steps (default: fit the terminal)")
    p.set_defaults(func=run)


def _schedule_text(args: argparse.Namespace) -> str:
    if args.k2 is not None:
        return f"{args.k1},{args.k2}"
    if "," not in args.k1:
        raise ValueError(f"give the schedule as K1 K2 or K1,K2 (e.g. `tbptt schedule 3 7` or `3,7`); got only {args.k1!r}")
    return args.k1


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    try:
        schedule = TBPTT.parse(_schedule_text(args), errors=args.errors)
        positive_int(args.n, "--n", "the stream length")
        if args.width is not None:
            positive_int(args.width, "--width", "columns")
        if args.png:
            check_writable(args.png, "--png")
    except (TypeError, ValueError) as exc:
        print_error(exc)
        return 2
    console = Console()
    # the row labels ("T=<n> ") take the left of each line
    width = args.width or max(10, console.width - len(str(args.n)) - 4)
    console.print(render_timeline(schedule, args.n, width=width))
    console.print(cost_table(schedule, args.n))
    if args.png:
        png = Path(args.png)
        plot_schedule(schedule, args.n, path=png)
        console.print(f"wrote {png}")
    return 0
