"""What the training commands (train, compare, probe) share: their options, declared once with
choices taken from the registries they name (tasks, models, strategies, optimizers), the reading of
``--task-option KEY=VALUE``, ``--threads`` (every command that computes), and errors printed in the
command line's terms (flags, not Python names).
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from ..budget import Budget
from ..data import TASKS
from ..data import load_task as load
from ..data import task_options as accepted
from ..engine import STRATEGIES
from ..experiments.runs import MODEL_NAMES, OPTIMIZERS, torch_threads
from ..models import model_spec
from ..precision import PRECISIONS
from ..validate import (
    InvalidArgument,
    non_negative_number,
    positive_int,
    positive_number,
)
from .console import make_console


def add_task_options(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--task`` (required unless it has a ``default``) and ``--task-option KEY=VALUE``."""
    p.add_argument("--task", required=default is None, default=default, choices=TASKS,
                   help="the task to learn" + (f" (default {default})" if default else ""))
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option, e.g. delay=8, steps=200, difference=false or path=book.txt (repeatable)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--model`` (``--cell``, its former name, still works) and ``--hidden``."""
    p.add_argument("--model", "--cell", dest="model", default="lstm", metavar="MODEL",
                   help=f"the model: {', '.join(MODEL_NAMES)} (default lstm), or your own as "
                   "path/to/file.py:factory, a function called with the keywords n_inputs, n_outputs, hidden "
                   "that returns the nn.Module (--cell is the former name of this option)")
    p.add_argument("--hidden", type=int, default=32, help="hidden units (default 32)")


def check_model_options(args: argparse.Namespace) -> None:
    """Reject a bad ``--model`` or ``--hidden`` (the file of a ``file.py:factory`` is read later)."""
    model_spec(args.model, "--model")
    positive_int(args.hidden, "--hidden", "hidden units")


def add_run_options(p: argparse.ArgumentParser, epochs: Optional[int] = 10) -> None:
    """The task, model and training options every command that trains takes (``epochs``: the
    default of ``--epochs``; None: set by the budget, or the task's own default)."""
    add_task_options(p)
    default = f"default {epochs}" if epochs is not None else "default: 10, or as many as --budget allows"
    p.add_argument("--epochs", type=int, default=epochs, help=f"passes over the training streams ({default})")
    add_model_options(p)
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adam",
                   help="adam (default) or plain sgd (no momentum)")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate (default 0.01)")
    p.add_argument("--clip", type=float, default=1.0, help="clip each update's gradient norm, 0 for none (default 1)")
    p.add_argument("--strategy", choices=STRATEGIES, default="recompute",
                   help="windows that overlap earlier updates: recomputed at the current weights (exact, "
                   "default) or stored as first computed (Williams & Peng)")
    p.add_argument("--segment-length", type=int, default=None, metavar="STEPS",
                   help="steps per train_on call (default: the whole split in one call)")
    add_precision_option(p)


def add_precision_option(p: argparse.ArgumentParser) -> None:
    """``--precision {fp32,bf16,fp16}``: the dtype the model's forward runs at (``Trainer(precision=)``)."""
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="the model's forward under torch.autocast at bf16 or fp16 (fp16 with a loss scale); weights, "
                   "optimizer and losses stay float32 (default fp32; on CPU bf16 is usually slower for small models)")


DEFAULT_THREADS = 1
"""``--threads`` when none is given. One: the recurrent models these commands train step through
time in small operations that a second thread cannot share, so it only adds work, and on a busy
machine it waits for a core (benchmarks/README.md, "Threads", has the measurement)."""


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's intra-op threads for the command (``torch.set_num_threads``)."""
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, metavar="N",
                   help=f"torch threads on the CPU (default {DEFAULT_THREADS}: a small recurrent model's steps are "
                   "too small to share, and more threads cost more CPU time, and on a busy machine more wall time "
                   "too; measured in benchmarks/README.md, Threads)")


def check_threads(args: argparse.Namespace) -> int:
    """``--threads`` checked (a positive int)."""
    return positive_int(args.threads, "--threads", "torch threads")


def using_threads(args: argparse.Namespace):
    """A context in which torch uses ``--threads`` threads; the count before it is restored after."""
    return torch_threads(check_threads(args))


def add_budget_option(p: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    """``--budget KIND:AMOUNT``: what each run may spend (``tbptt.budget``)."""
    p.add_argument("--budget", default=default, metavar="KIND:AMOUNT",
                   help="what each run may spend: epochs:N, cpu:SECONDS (CPU seconds of training, validation not "
                   "counted) or backward:STEPS (backward steps, the gradient cost); a run stops between two updates "
                   f"once it is spent; with --epochs as well, the epochs cap the run (default: "
                   f"{default or 'epochs:10'})")


def check_budget(args: argparse.Namespace) -> Optional[str]:
    """The budget of ``--budget`` as text (``"cpu:3"``), checked; None when none was given."""
    if args.budget is None:
        return None
    budget = Budget.parse(args.budget, "--budget")
    if budget.kind == "epochs" and args.epochs is not None and args.epochs != budget.amount:
        raise InvalidArgument("--epochs", args.epochs, f"left out or {budget.amount} with --budget {budget}")
    return str(budget)


def task_defaults(args: argparse.Namespace, task: Any) -> None:
    """Fill in what the command line left to the task: ``--segment-length`` and, without a budget,
    ``--epochs`` (a long text suggests calls of a few hundred steps and fewer epochs); 10 epochs
    when the task suggests none."""
    if args.segment_length is None:
        args.segment_length = task.segment_length
    if args.epochs is None and getattr(args, "budget", None) is None:
        args.epochs = task.epochs or 10


def check_run_options(args: argparse.Namespace) -> None:
    """Reject bad values of the options ``add_run_options`` declares, before any work starts."""
    positive_int(args.epochs, "--epochs", none="set by the budget")
    check_model_options(args)
    positive_number(args.lr, "--lr")
    non_negative_number(args.clip, "--clip", "0 turns clipping off")
    if args.segment_length is not None:
        positive_int(args.segment_length, "--segment-length", "steps per call")


def flag_error(exc: Exception, parser: argparse.ArgumentParser | None = None) -> Exception:
    """``exc`` in the command line's terms: an ``InvalidArgument`` about ``segment_length`` becomes
    one about ``--segment-length`` when the command has that flag (and so do the arguments it
    mentions)."""
    if not isinstance(exc, InvalidArgument):
        return exc

    def flag(name: str) -> str | None:
        if name.startswith("-"):
            return name
        candidate = "--" + name.replace("_", "-")
        if parser is not None and candidate not in parser._option_string_actions:  # noqa: SLF001
            return None
        return candidate

    others = {m: f for m in exc.mentions if (f := flag(m)) is not None}
    own = flag(exc.name)
    if own == exc.name and not others:
        return exc
    return exc.renamed(own or exc.name, others)


def print_error(exc: Exception, parser: argparse.ArgumentParser | None = None) -> None:
    """One red line on standard error: what is wrong, in flags."""
    from rich.markup import escape

    # escaped: messages quote paths and torch's own errors, whose [brackets] are not markup; in a
    # log, one line however long (a path cut in two cannot be copied)
    make_console(stderr=True).print(f"[red]error:[/red] {escape(str(flag_error(exc, parser)))}", highlight=False,
                                    soft_wrap=True)


def task_options(name: str, items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as the task's options, each read as the type of its default
    (true/false for a boolean)."""
    defaults = accepted(name)
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in defaults:
            listed = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
            raise ValueError(f"bad --task-option {item!r}: task {name!r} takes KEY=VALUE with KEY one of: {listed}")
        options[key] = _read_option(item, key, text, defaults[key])
    # a None default is a file the task cannot do without (the text task's corpus)
    if defaults.get("path", "") is None and "path" not in options:
        raise ValueError(f"task {name!r} reads a file: pass --task-option path=FILE")
    return options


def _read_option(item: str, key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"bad --task-option {item!r}: {key} takes true or false")
        return text.lower() in ("true", "1")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise ValueError(f"bad --task-option {item!r}: {key} takes a{'n' if isinstance(default, int) else ''} "
                             f"{type(default).__name__}, e.g. {key}={default}") from None
    return text


def unreadable(exc: OSError) -> ValueError:
    """A task's file that cannot be read, as the error a command prints."""
    return ValueError(f"cannot read {exc.filename or 'the task file'}: {exc.strerror or exc}; "
                      "check --task-option path")


def load_task(name: str, items: list[str]) -> Any:
    """The task ``name`` with the ``KEY=VALUE`` options of a command line (ValueError on bad ones,
    or on a file that cannot be read)."""
    options = task_options(name, items)
    try:
        return load(name, **options)
    except OSError as exc:
        raise unreadable(exc) from None
