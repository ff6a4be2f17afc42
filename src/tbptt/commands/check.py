"""``tbptt check --model NAME|path.py:factory [--task TASK]``: does a model keep the engine's
contract? ``tbptt.check_model`` on a sample of a task's training streams; exit 1 on a problem."""

from __future__ import annotations

import argparse

import torch

from ..modelcheck import MIN_STEPS, check_model
from ..validate import non_negative_int, positive_int
from ..experiments.runs import model_for
from .options import (
    add_model_options,
    add_task_options,
    add_threads_option,
    check_model_options,
    check_threads,
    load_task,
    print_error,
    using_threads,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "check",
        help="check that a model keeps the engine's contract (tbptt.check_model)",
        description="Build --model for --task and run tbptt.check_model on a sample of the task's training "
        "streams: the sample in one call against the same steps cut into pieces with the state carried, rows "
        "independent, the state's batch dims, the gradient through the state. Prints every check with its "
        "measured error; exit status 1 when the model breaks the contract, 2 on bad input.",
    )
    add_model_options(p)
    add_task_options(p, default="echo")
    p.add_argument("--rows", type=int, default=4, help="streams in the sample (default 4; 2 or more check the rows)")
    p.add_argument("--steps", type=int, default=64, help=f"steps in the sample (default 64, at least {MIN_STEPS})")
    p.add_argument("--seed", type=int, default=0, help="seeds the model's initialisation (default 0)")
    add_threads_option(p)
    p.set_defaults(func=run, parser=p)


def run(args: argparse.Namespace) -> int:
    try:
        check_model_options(args)
        positive_int(args.rows, "--rows", "streams")
        positive_int(args.steps, "--steps")
        non_negative_int(args.seed, "--seed")
        check_threads(args)
        task = load_task(args.task, args.task_option)
        torch.manual_seed(args.seed)
        model = model_for(task, args.model, args.hidden)
        inputs = task.train.inputs[: args.rows, : args.steps]
        if inputs.shape[1] < MIN_STEPS:
            raise ValueError(f"task {args.task!r} has {inputs.shape[1]} training steps; the checks need a sample "
                             f"of at least {MIN_STEPS}: lengthen the task (--task-option steps=...)")
        with using_threads(args):
            report = check_model(model, inputs)
    except (TypeError, ValueError) as exc:
        print_error(exc, args.parser)
        return 2
    print(f"{args.model} on {args.task} ({task.description}):")
    print(report)
    return 0 if report.ok else 1
