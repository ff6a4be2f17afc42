"""``Trainer(compile=True)`` against the eager forward: time per update, the compile time, and the
losses of the two.

Models (B = 16, 16 inputs, 16 outputs): ``cell``, a Python loop over ``nn.LSTMCell(16, 64)`` steps
inside ``forward`` with a linear head; ``lstm64`` and ``lstm256``, the fused ``nn.LSTM`` with a
linear head (``tbptt.models.RecurrentNet``). Schedules TBPTT(16,16) and TBPTT(8,32), recompute,
SGD (lr 1e-3) on random regression streams, per-step squared error. Run:

    python benchmarks/compile.py [--repeats 5] [--models cell,lstm64,lstm256] [--out benchmarks/results/compile-cpu.md]

For each model and schedule both arms start from the same weights on the same streams. Warm-up
(untimed, reported): two ``train_on`` calls of 128 steps from a fresh stream, which meet every
input length the schedule makes (the first windows are shorter) and so every compilation; its wall
time and CPU time (this process's and its children's: inductor compiles C++ in worker processes)
are reported for both arms, the difference being the compile time. Then ``repeats`` timed calls of
128 more steps per arm, the arms alternating (order flipped every repeat), process CPU time, one
thread. A compilation during the timed calls is counted and shown. "losses" is the largest relative
difference between the two arms' update losses over all the updates made. Inductor's on-disk cache
is a fresh folder (removed at the end), so the compile time is a first run's; ``--warm-cache``
keeps torch's own cache (what a second run of the same model costs).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable

if "--warm-cache" not in sys.argv:  # before torch reads it
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="tbptt-inductor-")

import torch
from torch import nn

from models import measure, row  # benchmarks/models.py: interleaved timing and its table row
from tbptt import TBPTT, Trainer
from tbptt.files import atomic_write_text
from tbptt.models import RecurrentNet

BATCH, FEATURES, CALL = 16, 16, 128


class CellLoop(nn.Module):
    """``nn.LSTMCell`` stepped in a Python loop over the steps of a call, a linear head on each step."""

    def __init__(self, n_inputs: int, hidden: int, n_outputs: int) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(n_inputs, hidden)
        self.head = nn.Linear(hidden, n_outputs)

    def forward(self, x: torch.Tensor, state=None):
        outputs = []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
            outputs.append(state[0])
        return self.head(torch.stack(outputs, dim=1)), state


MODELS: dict[str, Callable[[], nn.Module]] = {
    "cell": lambda: CellLoop(FEATURES, 64, FEATURES),
    "lstm64": lambda: RecurrentNet(FEATURES, 64, FEATURES),
    "lstm256": lambda: RecurrentNet(FEATURES, 256, FEATURES),
}
SCHEDULES = {"TBPTT(16,16)": TBPTT(16, 16), "TBPTT(8,32)": TBPTT(8, 32)}


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).mean(-1)


def graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def clocks() -> tuple[float, float]:
    """Wall time and the CPU time of this process and its finished children."""
    t = os.times()
    return time.perf_counter(), t.user + t.system + t.children_user + t.children_system


class Arm:
    """One trainer continuing its streams call after call; the losses of every update it made."""

    def __init__(self, model: nn.Module, schedule: TBPTT, compiled: bool, data: tuple[torch.Tensor, torch.Tensor]):
        self.trainer = Trainer(model, mse, torch.optim.SGD(model.parameters(), lr=1e-3), schedule, compile=compiled)
        self.inputs, self.targets = data
        self.at, self.losses, self.updates = 0, [], 0

    def call(self) -> None:
        a = self.at % (self.inputs.shape[1] - CALL)
        records = self.trainer.train_on(self.inputs[:, a:a + CALL], self.targets[:, a:a + CALL])
        self.at, self.updates = self.at + CALL, len(records)
        self.losses += [r.loss for r in records]


def one_row(name: str, label: str, repeats: int) -> tuple[str, dict]:
    torch._dynamo.reset()  # each row compiles afresh (and within dynamo's limit of 8 graphs per function)
    before = graphs()
    torch.manual_seed(0)
    model = MODELS[name]()
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(BATCH, 4096, FEATURES, generator=g), torch.randn(BATCH, 4096, FEATURES, generator=g))
    arms = {"compiled": Arm(copy.deepcopy(model), SCHEDULES[label], True, data),
            "eager": Arm(model, SCHEDULES[label], False, data)}
    warm = {}
    for arm_name, arm in arms.items():
        wall, cpu = clocks()
        for _ in range(2):
            arm.call()
        after = clocks()
        warm[arm_name] = (after[0] - wall, after[1] - cpu)
    compiled_graphs = graphs() - before
    runs = measure({k: (lambda _, a=a: a.call()) for k, a in arms.items()}, False, repeats)
    late = graphs() - before - compiled_graphs
    per_update = {k: [t / arms[k].updates for t in v] for k, v in runs.items()}
    a, b = arms["compiled"].losses, arms["eager"].losses
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    cells = [name, label, f"{warm['compiled'][0]:.1f} s / {warm['compiled'][1]:.1f} s",
             f"{warm['eager'][0]:.2f} s", str(compiled_graphs)]
    line = row(cells, per_update, [f"{worst:.1e}", str(late)])
    detail = {"per_update_ms": {k: [v * 1e3 for v in r] for k, r in per_update.items()}, "warm_up": warm,
              "graphs": compiled_graphs, "late_graphs": late, "loss_relative_difference": worst,
              "median_ratio": statistics.median(per_update["compiled"]) / statistics.median(per_update["eager"])}
    return line, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default=None, help="write the table (markdown) here")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache of earlier runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        lines = table(args)
    finally:
        if not args.warm_cache:
            shutil.rmtree(_CACHE, ignore_errors=True)
    if args.out:
        atomic_write_text(args.out, "\n".join(lines) + "\n")
        print(f"wrote {args.out}")


def table(args: argparse.Namespace) -> list[str]:
    cache = "kept from earlier runs" if args.warm_cache else "empty at the start (a first run's compile time)"
    lines = [
        f"Machine: {platform.machine()}, {platform.platform()}, torch {torch.__version__}, 1 thread, "
        f"{os.cpu_count()} CPUs; gcc for inductor's C++; inductor's cache {cache}.",
        f"B = {BATCH}, {FEATURES} inputs and outputs, calls of {CALL} steps, recompute, SGD. Per update, in ms: "
        f"min / median / max of {args.repeats} interleaved calls (process CPU time); ratio = compiled / eager "
        "of the medians (in brackets the range of the per-repeat ratios). Warm-up: wall / CPU (with children) "
        "seconds of the first two calls; graphs: compiled in the warm-up; late: compiled while timed.",
        "",
        "| model | schedule | warm-up compiled | warm-up eager | graphs | compiled (ms/update) | eager (ms/update) "
        "| compiled / eager | losses (max rel. diff.) | late |",
        "|---|---|---|---|---:|---|---|---:|---:|---:|",
    ]
    for name in args.models.split(","):
        for label in SCHEDULES:
            line, detail = one_row(name, label, args.repeats)
            lines.append(line)
            print(line, detail, flush=True)
    return lines


if __name__ == "__main__":
    main()
