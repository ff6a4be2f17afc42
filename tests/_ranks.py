"""Starting and waiting for the processes of a data-parallel test job on loopback."""

from __future__ import annotations

import socket
import time
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable[..., None], args: tuple, world: int, seconds: float, start_method: str) -> list[Any]:
    """Run ``fn(rank, *args)`` in ``world`` processes; their exit codes. Fails, after killing them,
    if any is still running after ``seconds``."""
    context = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method=start_method)
    deadline = time.monotonic() + seconds
    for p in context.processes:
        p.join(max(0.1, deadline - time.monotonic()))
    alive = [p for p in context.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "the ranks hung"
    return [p.exitcode for p in context.processes]
