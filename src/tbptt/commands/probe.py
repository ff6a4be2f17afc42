"""``tbptt probe``: how fast does the gradient decay with lag in a task's model, and how large
must k2 be? Measured untrained and after a short training."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..diagnostics import gradient_vs_lag
from ..experiments.plots import plot_lag_profiles
from ..experiments.runs import OPTIMIZERS, model_for
from ..files import check_writable
from ..schedule import TBPTT
from ..trainer import Trainer
from ..validate import fraction, positive_int
from .options import add_run_options, check_run_options, load_task, print_error


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "probe",
        help="measure gradient against lag and recommend k2",
        description="Measure the norm of d l_t / d s_(t-tau) for tau = 1..L (L = --max-lag), averaged over "
        "steps t, for a task's model untrained and after a short training; plot both curves and recommend "
        "k2: the shortest window whose dropped lags (a window of k2 steps keeps lags 1..k2-1) carry at most "
        "--fraction of the gradient's mass.",
    )
    add_run_options(p, epochs=3)
    p.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation (default 0)")
    p.add_argument("--max-lag", type=int, default=50, metavar="L", help="largest lag measured, L (default 50)")
    p.add_argument("--positions", type=int, default=32, help="steps t averaged over (default 32)")
    p.add_argument("--rows", type=int, default=8, help="validation streams probed (default 8)")
    p.add_argument("--fraction", type=float, default=0.01,
                   help="share of the gradient's mass the recommended k2 may drop, in (0, 1) (default 0.01)")
    p.add_argument("--config", default=None, metavar="K1,K2",
                   help="schedule of the short training (default L,L: TBPTT(L, L) with L = --max-lag)")
    p.add_argument("--png", default=None, help="plot file (default tbptt-report/probe-TASK.png)")
    p.set_defaults(func=run, parser=p)


def _png(args: argparse.Namespace) -> Path:
    return Path(args.png or f"tbptt-report/probe-{args.task}.png")


def _check(args: argparse.Namespace) -> None:
    check_run_options(args)
    for name in ("max_lag", "positions", "rows"):
        positive_int(getattr(args, name), f"--{name.replace('_', '-')}")
    fraction(args.fraction, "--fraction", "e.g. 0.01")
    check_writable(_png(args), "--png")  # before the training, not after


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    try:
        _check(args)
        task = load_task(args.task, args.task_option)
        schedule = TBPTT.parse(args.config or f"{args.max_lag},{args.max_lag}")
        split = task.valid
        if split.steps <= args.max_lag:
            raise ValueError(f"--max-lag {args.max_lag} needs a validation stream longer than that; task "
                             f"{args.task!r} has {split.steps} steps: lower --max-lag or lengthen the task")
        torch.manual_seed(args.seed)
        model = model_for(task, args.model, args.hidden)
    except (TypeError, ValueError) as exc:
        print_error(exc, args.parser)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small recurrent models: threads only contend
    try:
        return _probe(args, task, model, schedule, split, console)
    finally:
        torch.set_num_threads(threads)


def _probe(args: argparse.Namespace, task: Any, model: Any, schedule: Any, split: Any, console: Any) -> int:
    from rich.table import Table

    rows = slice(0, min(args.rows, split.batch_size))
    pick = lambda t: None if t is None else t[rows]  # noqa: E731

    def probe():
        return gradient_vs_lag(model, split.inputs[rows], targets=split.targets[rows], loss_fn=task.loss_fn,
                               max_lag=args.max_lag, positions=args.positions, mask=pick(split.mask),
                               resets=pick(split.resets))

    profiles = {"untrained": probe()}
    trainer = Trainer(model, task.loss_fn, OPTIMIZERS[args.optimizer](model.parameters(), lr=args.lr), schedule,
                      strategy=args.strategy, clip_grad_norm=args.clip or None)
    history = trainer.fit(task.train, epochs=args.epochs, valid=task.valid, metric=task.metric, progress=None,
                          segment_length=args.segment_length)
    metric = history.epochs[-1].get("valid_metric", float("nan"))
    profiles["trained"] = probe()

    table = Table(title=f"{task.name}, {args.model}: gradient norm against lag", title_justify="left")
    table.add_column("model")
    shown = sorted({1, 2, 5, 10, 20, 50, 100, args.max_lag} & set(range(1, args.max_lag + 1)))
    for lag in shown:
        table.add_column(f"lag {lag}", justify="right")
    table.add_column("ratio/lag", justify="right")
    table.add_column("k2", justify="right")
    for name, profile in profiles.items():
        k2 = profile.recommend_k2(args.fraction)
        verdict = "exploding" if profile.exploding else (str(k2) if k2 is not None else f"> {args.max_lag}")
        table.add_row(name, *[f"{profile.norms[lag - 1]:.3g}" for lag in shown], f"{profile.growth:.3g}", verdict)
    console.print(table)
    console.print(f"trained: {args.epochs} epochs of {schedule}; validation {task.metric_name} {metric:.4g} "
                  f"(baseline {task.baseline['valid']:.4g})")
    if task.dependency is not None:
        console.print(f"the task's known dependency: {task.dependency} steps (a window must be longer to span it)")
    trained = list(profiles.values())[-1]
    k2 = trained.recommend_k2(args.fraction)
    if trained.exploding:
        console.print("[red]the trained model's gradient grows with lag (exploding): clip gradients, "
                      "lower the learning rate, or keep k2 short[/red]")
    elif k2 is None:
        console.print(f"more than {args.fraction:g} of the gradient lies at lag {args.max_lag} or beyond: "
                      f"probe further (--max-lag) or use a longer k2")
    else:
        console.print(f"recommended k2 = {k2}: a window of {k2} steps keeps lags 1..{k2 - 1}; the lags it drops "
                      f"({k2} and beyond) carry at most {args.fraction:g} of the gradient")
    png = _png(args)
    plot_lag_profiles(profiles, png, args.fraction, task.dependency,
                      title=f"{task.name}, {args.model}: gradient against lag")
    console.print(f"plot: {png}")
    return 0
