"""Timing contenders side by side (interleaved, repeated) and measuring their peak memory."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import sys
import time
from typing import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

from .jobs import Job, Workload


def machine_info(device: str) -> dict[str, str]:
    """Where the numbers come from: CPU, threads, torch version and accelerator."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cudnn"] = str(torch.backends.cudnn.version())
    return info


def measure(work: Workload, jobs: dict[str, Job], repeats: int, warmup: int,
            timer: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each run of each job by ``timer``, the jobs interleaved (order alternating) in
    each repeat, after ``warmup`` untimed runs of each. The garbage collector is held off while a
    run is timed."""
    for _ in range(warmup):
        for job in jobs.values():
            job()[0]()
    gc.collect()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for r in range(repeats):
        names = list(jobs) if r % 2 == 0 else list(reversed(jobs))
        for name in names:
            run, _ = jobs[name]()
            gc.disable()
            try:
                work.sync()
                start = timer()
                run()
                work.sync()
                times[name].append(timer() - start)
            finally:
                gc.enable()
    return times


def peak_memory(work: Workload, job: Job) -> tuple[float, int]:
    """One run of ``job``: (seconds, peak bytes above the level before it; see the module docstring).
    The seconds include the profiler's overhead on CPU: the timed rows come from ``measure``."""
    run, _ = job()
    if work.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() - base
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.__enter__()
    try:
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    return seconds, _allocator_peak(prof)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    # some torch builds log every profiler start and stop from C++ straight to file descriptor 2
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _allocator_peak(prof: profile) -> int:
    # kineto records one "[memory]" event per CPU allocation (+bytes) and free (-bytes); the
    # FunctionEvent view folds most of them into their ops, so read the raw events
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak
