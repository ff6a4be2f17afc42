"""How large a graph a run will hold, estimated before it starts, and a clear error when it would not
fit in the memory there is.

A window of k2 steps holds the activations of k2 steps until its backward pass (``SEMANTICS.md``,
"Cost"); TBPTT(n, n) and TBPTT(1, n) hold the whole stream. ``check_graph_memory`` measures the
bytes autograd saves per step on the first steps of the data (one short forward pass, with the
random generators and the model's buffers put back afterwards), multiplies by the longest window
the schedule will backpropagate through, and compares with the memory available on the device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpointing import segment_cuts
from .contract import call_model
from .schedules import longest_window as schedule_window

PROBE_STEPS = 16
"""Steps run to measure the graph's bytes per step."""


class GraphMemoryError(MemoryError):
    """A run whose graph would not fit in the memory available, found before it starts."""


def _meminfo_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> Optional[int]:
    """What a container's memory limit (cgroup v2) leaves, if there is one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
    except OSError:
        return None
    if limit == "max":
        return None
    try:
        return max(0, int(limit) - int(used))
    except ValueError:
        return None


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` (CUDA: free device memory; CPU: what the system and a container's
    limit leave), or None where it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    known = [b for b in (_meminfo_available(), _cgroup_available()) if b is not None]
    return min(known) if known else None


def graph_bytes_per_step(model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """Bytes autograd saves per step when ``model`` runs ``inputs[B, T, ...]`` (its first
    ``PROBE_STEPS`` steps, from state None, in training mode) with a graph. Leaves the random
    generators, the model's buffers and its mode as they were."""
    steps = min(PROBE_STEPS, inputs.shape[1])
    seen: dict[Any, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            seen[(storage.device, storage.data_ptr())] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    training = model.training
    devices = [inputs.device] if inputs.is_cuda else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            model.train()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                outputs, _ = call_model(model, inputs[:, :steps], None)
            del outputs
    finally:
        model.train(training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    return sum(seen.values()) / steps


def longest_window(engine: Any, stream_steps: int) -> int:
    """Steps whose activations the engine holds at once at most, on streams of ``stream_steps``
    steps (a checkpointed window holds one segment's)."""
    k2 = schedule_window(engine.schedule)
    window = stream_steps if k2 is None else min(k2, stream_steps)
    if engine.checkpoint_segments is not None:
        cuts = [0, *segment_cuts(engine.checkpoint_segments, 0, window), window]
        window = max(b - a for a, b in zip(cuts[:-1], cuts[1:]))
    return window


def check_graph_memory(engine: Any, inputs: torch.Tensor, stream_steps: int, limit: Optional[int] = None) -> None:
    """Raise ``GraphMemoryError`` if training ``engine`` on streams of ``stream_steps`` steps would
    hold a graph larger than ``limit`` bytes (None: the memory available on the model's device),
    estimated from the bytes per step measured on ``inputs`` (the first data to train on)."""
    device = next((p.device for p in engine.model.parameters()), inputs.device)
    room = limit if limit is not None else available_bytes(device)
    if room is None:
        return
    per_step = graph_bytes_per_step(engine.model, inputs)
    window = longest_window(engine, stream_steps)
    need = per_step * window
    if need <= room:
        return
    advice = ["shorter streams (cut the data into more, shorter rows)"]
    if schedule_window(engine.schedule) is None or schedule_window(engine.schedule) > PROBE_STEPS:
        advice.insert(0, "a shorter window k2")
    if not engine.overlapping and engine.checkpoint_segments is None:
        cuts = [0, *segment_cuts("sqrt", 0, window), window]
        sqrt = max(b - a for a, b in zip(cuts[:-1], cuts[1:])) * per_step
        advice.insert(0, f"Trainer(..., checkpoint_segments='sqrt') (recomputes inside segments; about "
                         f"{_size(sqrt)} here)")
    where = "the limit max_graph_bytes" if limit is not None else f"the memory available on {device}"
    raise GraphMemoryError(
        f"{engine.schedule} ({engine.strategy}) would hold a graph of about {_size(need)} ({_size(per_step)} per "
        f"step, measured on the first {min(PROBE_STEPS, inputs.shape[1])} steps, times a window of {window} steps), "
        f"more than {where} ({_size(room)}); use " + ", or ".join(advice)
    )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"
