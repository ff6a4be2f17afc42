"""What training inside Lightning costs per TBPTT update: TBPTTModule in a Lightning fit against
tbptt.Trainer on the same model and data, and against a hand-written Lightning manual-optimization
loop for TBPTT(k, k) (chunks of k, state carried and detached, one step per chunk).

Every arm trains the same RecurrentNet (nn.LSTM + linear head, plain SGD) from the same weights on
the same streams, fed as the same segments. Each run is a fit of a few epochs; an epoch's time is
the process CPU time of its training (one torch thread) and the per-update cost is the median over
the epochs after the first, divided by the epoch's updates; the fit's fixed cost (Lightning's
set-up and tear-down) is the rest of the run. The arms are run in turn, the order alternating
between repeats; ratios are taken per repeat and reported as median [min, max]. Run:

    python benchmarks/lightning_overhead.py [--repeats 5] [--out benchmarks/results/lightning-overhead.md]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import time
import warnings
from typing import Any, Callable, Optional

import torch

import lightning
import tbptt
from tbptt.bench.workloads import Workload, per_step_mse
from tbptt.files import atomic_write_text
from tbptt.lightning import TBPTTModule, segments

Arm = Callable[[Workload], tuple[list[float], float, int]]
"""One run: (seconds of each epoch's training, seconds of the whole run, updates per epoch)."""


class ChunkedModule(lightning.pytorch.LightningModule):
    """TBPTT(k, k) written by hand under manual optimization, as Lightning's 2.x docs show it: each
    batch is cut into chunks of k steps; per chunk a forward from the carried state, backward, step,
    and the state detached; the last chunk's loss is logged once per step. The streams go on from
    batch to batch and start afresh each pass."""

    def __init__(self, model: torch.nn.Module, k: int, lr: float) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model, self.k, self.lr = model, k, lr
        self.state: Any = None

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if batch.start == 0:
            self.state = None
        optimizer = self.optimizers()
        for a in range(0, batch.inputs.shape[1], self.k):
            outputs, state = self.model(batch.inputs[:, a:a + self.k], self.state)
            loss = per_step_mse(outputs, batch.targets[:, a:a + self.k]).mean()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            self.state = tuple(s.detach() for s in state)
        self.log("train_loss", loss.detach(), on_step=True, on_epoch=False, batch_size=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class EpochClock(lightning.pytorch.Callback):
    """The process CPU time of each training epoch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        self._start = time.process_time()

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        self.seconds.append(time.process_time() - self._start)


def lightning_arm(make: Callable[[Workload], lightning.pytorch.LightningModule], length: int, epochs: int,
                  updates: int) -> Arm:
    def run(work: Workload) -> tuple[list[float], float, int]:
        module, clock = make(work), EpochClock()
        trainer = lightning.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
        loader = segments(work.inputs, work.targets, segment_length=length)
        start = time.process_time()
        trainer.fit(module, loader)
        return clock.seconds, time.process_time() - start, updates

    return run


def trainer_arm(schedule: tbptt.TBPTT, strategy: str, length: int, epochs: int, updates: int) -> Arm:
    def run(work: Workload) -> tuple[list[float], float, int]:
        model = work.model()
        trainer = tbptt.Trainer(model, per_step_mse, work.optimizer(model.parameters()), schedule, strategy)
        seconds = []
        start = time.process_time()
        for _ in range(epochs):
            epoch = time.process_time()
            for a in range(0, work.n, length):
                trainer.train_on(work.inputs[:, a:a + length], work.targets[:, a:a + length],
                                 end_of_stream=a + length >= work.n)
            seconds.append(time.process_time() - epoch)
        return seconds, time.process_time() - start, updates

    return run


class LossOnly(TBPTTModule):
    """TBPTTModule logging what the hand-written loop logs (the loss, once per step)."""

    def log_updates(self, records: list[tbptt.UpdateRecord]) -> None:
        if records:
            self.log("train_loss", records[-1].loss, on_step=True, on_epoch=False, batch_size=1)


def module_maker(schedule: tbptt.TBPTT, strategy: str, cls: type = TBPTTModule) -> Callable[[Workload], TBPTTModule]:
    return lambda work: cls(work.model(), per_step_mse, optimizer=work.optimizer, schedule=schedule, strategy=strategy)


def arms_for(k1: int, k2: int, strategy: str, n: int, length: int, epochs: int) -> dict[str, Arm]:
    schedule = tbptt.TBPTT(k1, k2)
    updates = len(schedule.updates(n))
    arms = {"tbptt.Trainer": trainer_arm(schedule, strategy, length, epochs, updates)}
    for size in [length] + ([k1] if k1 == k2 else []):
        arms[f"TBPTTModule, segments of {size}"] = lightning_arm(module_maker(schedule, strategy), size, epochs, updates)
        arms[f"TBPTTModule logging only the loss, segments of {size}"] = lightning_arm(
            module_maker(schedule, strategy, LossOnly), size, epochs, updates)
        if k1 == k2:
            arms[f"hand-written Lightning loop, segments of {size}"] = lightning_arm(
                lambda w: ChunkedModule(w.model(), k1, w.lr), size, epochs, updates)
    return arms


def measure(work: Workload, arms: dict[str, Arm], repeats: int) -> dict[str, list[dict[str, float]]]:
    """Each arm's runs (per-update and fixed seconds), interleaved, after one untimed warm-up of each."""
    for arm in arms.values():
        arm(work)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    for r in range(repeats):
        for name in (list(arms) if r % 2 == 0 else list(reversed(arms))):
            gc.collect()
            gc.disable()
            try:
                epochs, total, updates = arms[name](work)
            finally:
                gc.enable()
            runs[name].append({"per_update": statistics.median(epochs[1:]) / updates,
                               "fixed": total - sum(epochs), "updates": updates})
    return runs


def summarize(runs: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """Per arm: the medians, and the per-update ratio to tbptt.Trainer and, for the module, to the
    hand-written loop fed the same segments (median, min and max over the repeats' pairs)."""
    rows = []
    for name, mine in runs.items():
        row: dict[str, Any] = {"arm": name, "ms_per_update": 1e3 * statistics.median(r["per_update"] for r in mine),
                               "fixed_s": statistics.median(r["fixed"] for r in mine)}
        size = name.rsplit(" ", 1)[-1]
        for key, other in (("vs_trainer", "tbptt.Trainer"), ("vs_hand", f"hand-written Lightning loop, segments of {size}")):
            if other in runs and other != name and not (key == "vs_hand" and name.startswith("hand")):
                ratios = [a["per_update"] / b["per_update"] for a, b in zip(mine, runs[other])]
                row[key] = (statistics.median(ratios), min(ratios), max(ratios))
        rows.append(row)
    return rows


def table(title: str, rows: list[dict[str, Any]]) -> str:
    ratio = lambda r: f"{r[0]:.2f} [{r[1]:.2f}, {r[2]:.2f}]" if r else ""  # noqa: E731
    lines = [f"### {title}", "", "| arm | ms per update | fixed s per fit | / tbptt.Trainer | / hand-written loop |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['arm']} | {row['ms_per_update']:.2f} | {row['fixed_s']:.3f} | "
                     f"{ratio(row.get('vs_trainer'))} | {ratio(row.get('vs_hand'))} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit (the first is not timed per update)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--out", action="append", default=[], help="write the tables (.md) or runs (.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    n, length = (64, 32) if args.quick else (1024, 128)
    sizes = {"B=16, hidden 64": (16, 16, 64, 16), "B=32, hidden 256": (32, 32, 256, 32)}
    configs = [(16, 16, "recompute", "B=16, hidden 64"), (16, 16, "recompute", "B=32, hidden 256"),
               (8, 32, "recompute", "B=16, hidden 64"), (8, 32, "stored", "B=16, hidden 64")]
    if args.quick:
        configs = configs[:1]
    text = [f"# TBPTTModule in Lightning {lightning.__version__}: cost per update\n",
            f"torch {torch.__version__}, one thread, process CPU time; n={n} steps per epoch, segments of "
            f"{length} unless said, {args.epochs} epochs per fit, {args.repeats} repeats; {platform.processor() or platform.machine()}\n"]
    record = []
    load = os.getloadavg()[0]
    for k1, k2, strategy, size in configs:
        batch, inputs, hidden, outputs = sizes[size]
        work = Workload(batch, inputs, hidden, outputs, n)
        arms = arms_for(k1, k2, strategy, n, length, args.epochs)
        runs = measure(work, arms, args.repeats)
        rows = summarize(runs)
        title = f"TBPTT({k1},{k2}) {strategy}, {size}"
        text.append(table(title, rows))
        record.append({"configuration": title, "rows": rows, "runs": runs})
        print(text[-1], flush=True)
    text.append(f"Load average of the machine (2 cores, shared): {load:.1f} at the start, "
                f"{os.getloadavg()[0]:.1f} at the end.\n")
    for path in args.out:
        if path.endswith(".json"):
            atomic_write_text(path, json.dumps({"n": n, "segment_length": length, "epochs": args.epochs,
                                                "repeats": args.repeats, "results": record}, indent=1))
        else:
            atomic_write_text(path, "\n".join(text))


if __name__ == "__main__":
    main()
