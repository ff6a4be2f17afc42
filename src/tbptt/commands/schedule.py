"""``tbptt schedule K1 K2 --n N``: draw which steps each update covers, and what it costs
(``tbptt schedule artbp:10,30``: one draw of ARTBP's random windows)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..experiments.timeline import cost_table, drawn_updates, plot_schedule, render_timeline
from ..files import check_writable
from ..schedule import TBPTT
from ..schedules import parse_schedule
from ..validate import non_negative_int, positive_int
from .options import print_error


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "schedule",
        help="draw a TBPTT(k1, k2) schedule and its cost",
        description="Draw which steps each update of TBPTT(K1, K2) runs forward, backpropagates "
        "through and injects errors from, on a stream of N steps, with the cost in steps. "
        "The schedule is given as K1 K2 or as K1,K2; artbp:K1,MEAN_K2 draws one sample of ARTBP's "
        "random windows (--seed picks which).",
    )
    p.add_argument("k1", help="steps between updates (an int, or n for the whole stream); or K1,K2; or artbp:K1,MEAN_K2")
    p.add_argument("k2", nargs="?", default=None, help="steps backpropagated per update (an int, or n)")
    p.add_argument("--n", type=int, default=20, help="stream length (default 20)")
    p.add_argument("--errors", choices=("new", "window"), default="new",
                   help="inject each error once (new, default) or every error of the window")
    p.add_argument("--png", metavar="FILE", help="also write the drawing as a PNG (folders are created)")
    p.add_argument("--seed", type=int, default=0, help="ARTBP: which draw of its windows to show (default 0)")
    p.add_argument("--width", type=int, default=None,
                   help="terminal columns for the steps (default: fit the terminal)")
    p.set_defaults(func=run, parser=p)


def _schedule_text(args: argparse.Namespace) -> str:
    if args.k2 is not None:
        return f"{args.k1},{args.k2}"
    if "," not in args.k1 and ":" not in args.k1:
        raise ValueError(f"give the schedule as K1 K2 or K1,K2 (e.g. `tbptt schedule 3 7` or `3,7`); got only {args.k1!r}")
    return args.k1


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    try:
        schedule = parse_schedule(_schedule_text(args))
        if args.errors != "new":
            if not isinstance(schedule, TBPTT):
                raise ValueError(f"--errors window applies to TBPTT(k1, k2) only; {schedule} injects each error once")
            schedule = TBPTT(schedule.k1, schedule.k2, args.errors)
        positive_int(args.n, "--n", "the stream length")
        non_negative_int(args.seed, "--seed")
        if args.width is not None:
            positive_int(args.width, "--width", "columns")
        drawn_updates(schedule, 1, args.seed)  # a schedule that cannot be drawn says so here
        if args.png:
            check_writable(args.png, "--png")
    except (TypeError, ValueError) as exc:
        print_error(exc, args.parser)
        return 2
    console = Console()
    # the row labels ("T=<n> ") take the left of each line
    width = args.width or max(10, console.width - len(str(args.n)) - 4)
    console.print(render_timeline(schedule, args.n, width=width, seed=args.seed))
    console.print(cost_table(schedule, args.n, seed=args.seed))
    if args.png:
        png = Path(args.png)
        plot_schedule(schedule, args.n, path=png, seed=args.seed)
        console.print(f"wrote {png}")
    return 0
