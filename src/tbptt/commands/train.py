"""``tbptt train --task NAME --config K1,K2``: train one TBPTT(k1, k2) configuration on a task with
``Trainer.fit`` and compare its test metric with the task's trivial baseline.

Under torchrun (or with ``--distributed``) every rank trains its share of the streams with a
``DistributedTrainer`` and rank 0 alone prints, logs and checkpoints:

    torchrun --nproc_per_node 2 -m tbptt train --task echo --config 10,20 --log-file log.jsonl
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from pathlib import Path
from typing import Any

import torch

from .. import distributed as tdist
from ..checkpoint import CheckpointError
from ..experiments.runs import OPTIMIZERS, Configuration, model_for
from ..files import check_writable
from ..modelcheck import ModelContractError
from ..trainer import Trainer
from ..validate import positive_number
from .console import FitLog, make_console
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
    using_threads,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train one TBPTT(k1, k2) configuration on a task",
        description="Train a recurrent net on TASK with TBPTT(K1, K2), print each epoch and the test "
        "metric next to the task's trivial baseline. Under torchrun (or with --distributed) each rank "
        "trains its share of the streams and rank 0 prints: "
        "torchrun --nproc_per_node 2 -m tbptt train --task echo --config 10,20 --distributed",
    )
    add_run_options(p, epochs=None)
    add_budget_option(p)
    p.add_argument("--config", required=True, metavar="K1,K2[@KEY=VALUE,...]",
                   help="the schedule: K1 steps between updates, K2 steps backpropagated (n: whole stream), e.g. "
                   "10,40 or 20,20@lr=0.1 (keys lr, clip, strategy); or artbp:K1,MEAN_K2 (random windows, unbiased), "
                   "or adaptive:K1[@tolerance=0.1,max_k2=200,every=100] (k2 chosen from the measured gradient decay)")
    p.add_argument("--checkpoint", metavar="PATH", help="save the run here at the end of each epoch")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="also save every N updates")
    p.add_argument("--resume", action="store_true", help="continue the run saved at --checkpoint, if any")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: go on even if the training data differ from those the checkpoint was "
                   "written on (refused by default)")
    # --log-file: torchrun's own parser takes a bare --log for an abbreviation of its --log-dir
    p.add_argument("--log", "--log-file", dest="log", metavar="FILE",
                   help="write the epochs as .jsonl or .csv (under torchrun spell it --log-file)")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over torchrun's ranks (implied when torchrun's environment is set)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="distributed: how long a rank waits for the others before the job fails (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model's initialisation (default 0)")
    p.add_argument("--check-model", action="store_true",
                   help="before the first update, check that the model keeps the engine's contract "
                   "(tbptt.check_model on the first segment); a model that breaks it stops the run with the report")
    add_threads_option(p)
    p.set_defaults(func=run, parser=p)


def _check(args: argparse.Namespace) -> Configuration:
    check_run_options(args)
    check_threads(args)
    if args.timeout is not None:
        positive_number(args.timeout, "--timeout", "seconds")
    if args.log is not None and Path(args.log).suffix not in (".jsonl", ".csv"):
        raise ValueError(f"--log must end in .jsonl or .csv; got {args.log!r}")
    # output paths are checked now, not after the training
    for path, flag in ((args.log, "--log"), (args.checkpoint, "--checkpoint")):
        if path is not None:
            check_writable(path, flag)
    return Configuration.parse(args.config)


def run(args: argparse.Namespace) -> int:
    distributed = args.distributed or tdist.in_torchrun_env()
    joined = False
    try:
        config = _check(args)
        budget = check_budget(args)
        schedule = config.schedule
        task = load_task(args.task, args.task_option)
        task_defaults(args, task)
        rank, world = 0, 1
        if distributed:
            joined = not torch.distributed.is_initialized()
            rank, world = tdist.init_from_env(timeout=args.timeout or tdist.DEFAULT_TIMEOUT)
    except (ValueError, TypeError, tdist.DistributedError) as exc:
        print_error(exc, args.parser)
        return 2
    console = make_console(quiet=rank != 0)
    try:
        with using_threads(args):
            random.seed(args.seed)
            torch.manual_seed(args.seed)
            device = torch.device("cpu")
            if distributed and torch.distributed.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            model_name = config.model or args.model
            model = model_for(task, model_name, args.hidden).to(device)
            optimizer = OPTIMIZERS[args.optimizer](model.parameters(), lr=config.lr or args.lr)
            kind = tdist.DistributedTrainer if distributed else Trainer
            strategy = config.strategy or args.strategy
            trainer = kind(model, task.loss_fn, optimizer, schedule, strategy=strategy,
                           clip_grad_norm=config.clip or args.clip or None, check_model=args.check_model,
                           precision=args.precision)
            train = trainer.shard(task.train) if distributed else task.train
            console.print(f"{task.description}: {model_name}, {schedule}, {strategy}, "
                          f"{train.batch_size * world} streams{f' over {world} ranks' if distributed else ''}")
            logged = [] if console.is_terminal else [FitLog(console, train.steps, args.epochs)]
            history = trainer.fit(train.to(device), epochs=args.epochs, valid=task.valid.to(device),
                                  metric=task.metric, segment_length=args.segment_length,
                                  checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                                  resume=args.resume, log=args.log, allow_data_change=args.allow_data_change,
                                  budget=budget, callbacks=logged)
            if rank == 0:
                test = trainer.evaluate(task.test.to(device), metric=task.metric, segment_length=args.segment_length)
                report(console, task, history, test["metric"], world)
    except ModelContractError as exc:
        console.print(str(exc.report), markup=False, highlight=False, soft_wrap=True)
        print_error(ValueError(f"--model {args.model} breaks the engine's contract (report above); "
                               "fix the model, or train without --check-model at your own risk"), args.parser)
        return 2
    except (ValueError, TypeError, CheckpointError, MemoryError) as exc:
        print_error(exc, args.parser)
        return 2
    except tdist.DistributedError as exc:
        print_error(exc, args.parser)
        joined = _exit_if_unattended(joined)
        return 1
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    return 0


def _exit_if_unattended(joined: bool) -> bool:
    """After a failed collective: under torchrun its agent stops every rank, so return and let the
    caller go on (False: leave the broken group alone, whose teardown may wait on a hung peer). A
    plain launch (RANK, WORLD_SIZE... set by hand) has no agent: end this process now, with the
    error printed, rather than leave it waiting."""
    if joined and "TORCHELASTIC_RUN_ID" not in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return False


def report(console: Any, task: Any, history: Any, test_metric: float, world: int) -> None:
    """The per-epoch table, the test metric against the baseline, and the training throughput."""
    from rich.table import Table

    name = task.metric_name
    table = Table(title=f"{task.name}: {len(history.epochs)} epochs")
    for column in ("epoch", "train loss", "valid loss", f"valid {name}", "updates", "skipped", "seconds"):
        table.add_column(column, justify="right")
    for e in history.epochs:
        table.add_row(str(e["epoch"]), f"{e['train_loss']:.4g}", f"{e.get('valid_loss', math.nan):.4g}",
                      f"{e.get('valid_metric', math.nan):.4g}", str(e["updates"]), str(e["skipped"]),
                      f"{e['epoch_time']:.2f}")
    console.print(table)
    baseline = task.baseline["test"]
    better = test_metric > baseline if task.higher_is_better else test_metric < baseline
    verdict = "[green]beats[/green]" if better else "[red]does not beat[/red]"
    console.print(f"test {name}: {test_metric:.4g}, {verdict} the baseline ({task.baseline_name}): {baseline:.4g}")
    if history.stopped_by:
        console.print(f"stopped by {history.stopped_by}")
    seconds, updates = history.totals.wall_time, history.totals.updates
    if seconds > 0:
        console.print(f"{updates} update{'' if updates == 1 else 's'} in {seconds:.2f} s of training: "
                      f"{updates / seconds:.1f} updates/s on {world} process{'es' if world > 1 else ''}")
