"""The task registry: ``load_task(name, **options)`` builds any task in ``TASKS``; the synthetic
ones are in ``tbptt.data.synthetic``, the real ones (``co2``, ``sunspots``, ``text``) in
``tbptt.data.datasets``."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from . import datasets
from .synthetic import adding_task, copy_task, echo_task
from .task import Task


def _builders() -> dict[str, Callable[..., Task]]:
    return {
        "echo": echo_task,
        "adding": adding_task,
        "copy": copy_task,
        "co2": datasets.co2_task,
        "sunspots": datasets.sunspots_task,
        "text": datasets.text_task,
    }


TASKS: tuple[str, ...] = ("echo", "adding", "copy", "co2", "sunspots", "text")


def task_options(name: str) -> dict[str, Any]:
    """The options task ``name`` accepts, with their defaults."""
    builder = _builder(name)
    return {p.name: p.default for p in inspect.signature(builder).parameters.values()}


def load_task(name: str, **options: Any) -> Task:
    """Build task ``name`` (one of ``TASKS``) with ``options`` (see ``task_options(name)``)."""
    builder = _builder(name)
    accepted = task_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in accepted.items())
        raise ValueError(f"task {name!r} has no option {', '.join(unknown)}; its options are: {listed}")
    return builder(**options)


def _builder(name: str) -> Callable[..., Task]:
    builders = _builders()
    if name not in builders:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return builders[name]
