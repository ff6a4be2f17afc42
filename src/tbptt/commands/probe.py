"""``tbptt probe``: how fast does the gradient decay with lag in a task's model, and how large
must k2 be? Measured untrained and after a short training."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..diagnostics import gradient_vs_lag
from ..experiments.plots import plot_lag_profiles
from ..experiments.runs import OPTIMIZERS, Configuration, model_for
from ..files import check_writable
from ..trainer import Trainer
from ..validate import fraction, positive_int
from .console import make_console
from ..precision import autocast_for
from .options import (
    add_run_options,
    add_threads_option,
    check_run_options,
    check_threads,
    load_task,
    print_error,
    task_defaults,
    using_threads,
)


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
    add_threads_option(p)
    p.set_defaults(func=run, parser=p)


def _png(args: argparse.Namespace) -> Path:
    return Path(args.png or f"tbptt-report/probe-{args.task}.png")


def _check(args: argparse.Namespace) -> None:
    check_run_options(args)
    check_threads(args)
    for name in ("max_lag", "positions", "rows"):
        positive_int(getattr(args, name), f"--{name.replace('_', '-')}")
    fraction(args.fraction, "--fraction", "e.g. 0.01")
    check_writable(_png(args), "--png")  # before the training, not after


def run(args: argparse.Namespace) -> int:
    console = make_console()
    try:
        _check(args)
        task = load_task(args.task, args.task_option)
        task_defaults(args, task)
        schedule = Configuration.parse(args.config or f"{args.max_lag},{args.max_lag}").schedule
        split = task.valid
        if split.steps <= args.max_lag:
            raise ValueError(f"--max-lag {args.max_lag} needs a validation stream longer than that; task "
                             f"{args.task!r} has {split.steps} steps: lower --max-lag or lengthen the task")
        torch.manual_seed(args.seed)
        model = model_for(task, args.model, args.hidden)
        autocast_for(model, args.precision)  # a precision the model cannot train at fails here
    except (TypeError, ValueError) as exc:
        print_error(exc, args.parser)
        return 2
    with using_threads(args):
        return _probe(args, task, model, schedule, split, console)


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
                      strategy=args.strategy, clip_grad_norm=args.clip or None, precision=args.precision)
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
                  f"(baseline {task.baseline['valid']:.4g})", markup=False, highlight=False)
    for line in which_applies(profiles, args.fraction, args.max_lag, task, metric):
        console.print(line, markup=False, highlight=False)
    png = _png(args)
    plot_lag_profiles(profiles, png, args.fraction, task.dependency,
                      title=f"{task.name}, {args.model}: gradient against lag",
                      roles={"trained": "use this", "untrained": "lower bound"})
    console.print(f"plot: {png}")
    return 0


def which_applies(profiles: dict, fraction: float, max_lag: int, task: Any, metric: float) -> list[str]:
    """Which recommendation applies, and why: the trained model's decay is what the learnt task
    needs; the untrained one is where training starts, usually a lower bound."""
    trained, untrained = profiles["trained"], profiles["untrained"]
    k2, start = trained.recommend_k2(fraction), untrained.recommend_k2(fraction)
    lines = []
    if trained.exploding:
        return ["the trained model's gradient grows with lag (exploding): clip gradients, lower the learning rate, "
                "or keep k2 short; no k2 keeps a mass that does not decay"]
    if k2 is None:
        lines.append(f"more than {fraction:g} of the trained model's gradient lies at lag {max_lag} or beyond: "
                     "probe further (--max-lag) or use a longer k2")
    else:
        lines.append(f"use k2 = {k2} (the trained model's): a window of {k2} steps keeps lags 1..{k2 - 1}, and "
                     f"the lags it drops ({k2} and beyond) carry at most {fraction:g} of the gradient of a model that "
                     "has learnt the task; that decay is what the learnt task needs")
    if start is not None and k2 is not None and start <= k2:
        lines.append(f"the untrained model's k2 = {start} is a lower bound: its gradient decays faster "
                     f"({untrained.growth:.3g} per lag against {trained.growth:.3g} trained), since memory the task "
                     "needs is what training builds; a window that short drops what the trained model uses")
    elif start is not None and k2 is not None:
        lines.append(f"the untrained model's k2 = {start} is longer than the trained one's: here training shortened "
                     "the gradient's reach; the trained model's k2 is the one that applies")
    better = metric > task.baseline["valid"] if task.higher_is_better else metric < task.baseline["valid"]
    if not better:
        lines.append("the trained model does not beat the baseline yet: its decay may not show what the task needs; "
                     "train longer (--epochs) before trusting the recommendation")
    if task.dependency is not None:
        lines.append(f"the task's known dependency: {task.dependency} steps (a window must be longer to span it); "
                     "the probe measures where the gradient's mass lies, which may reach further")
    return lines
