"""``Trainer(precision="bf16")`` (and ``"fp16"`` where the CPU has the kernels) against fp32 on the
CPU: time per update, and the loss curves of the same training run at each precision.

Time: ``tbptt.models.RecurrentNet`` (``nn.LSTM`` or ``nn.RNN``, 16 inputs and outputs, linear head),
B = 16, TBPTT(16,16) and TBPTT(8,32), recompute, SGD (lr 1e-3) on random regression streams. Each
arm is a trainer from the same weights continuing its streams; after one warm-up call, ``repeats``
calls of 128 steps per arm, the arms alternating (order flipped every repeat), process CPU time,
one thread; per update, min / median / max. fp16 is timed on ``nn.RNN`` only: oneDNN has no
float16 ``nn.LSTM`` for training on most CPUs (``Trainer`` refuses it there).

Curves: the delayed-echo task (``tbptt.data.load_task("echo")``, cross-entropy), an LSTM of
hidden 64, TBPTT(10,20), Adam 1e-2, ``fit`` for ``--epochs`` epochs from the same seed at fp32
and bf16; per epoch the training and validation loss and the validation accuracy, and the largest
relative difference between the two runs' update losses. Run:

    python benchmarks/precision.py [--repeats 5] [--epochs 8] [--out benchmarks/results/precision-cpu.md]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform

import torch

from models import measure, row  # benchmarks/models.py: interleaved timing and its table row
from tbptt import TBPTT, Trainer
from tbptt.data import load_task
from tbptt.files import atomic_write_text
from tbptt.models import RecurrentNet

BATCH, FEATURES, CALL = 16, 16, 128
SIZES = [("lstm", 64, ("bf16",)), ("lstm", 256, ("bf16",)), ("rnn", 256, ("bf16", "fp16"))]
SCHEDULES = {"TBPTT(16,16)": TBPTT(16, 16), "TBPTT(8,32)": TBPTT(8, 32)}


def cpu_features() -> str:
    """The CPU's low-precision instruction sets (Linux), which decide what bf16 and fp16 cost."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile")
    return ", ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).mean(-1)


def timing_rows(repeats: int) -> list[str]:
    lines = ["| model | schedule | precision | ms/update | fp32 ms/update | precision / fp32 |",
             "|---|---|---|---|---|---:|"]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, 4096, FEATURES, generator=g), torch.randn(BATCH, 4096, FEATURES, generator=g)
    for cell, hidden, precisions in SIZES:
        for label, schedule in SCHEDULES.items():
            for precision in precisions:
                torch.manual_seed(0)
                model = RecurrentNet(FEATURES, hidden, FEATURES, cell=cell)
                trainers = {p: Trainer(m, mse, torch.optim.SGD(m.parameters(), lr=1e-3), schedule, precision=p)
                            for p, m in ((precision, copy.deepcopy(model)), ("fp32", model))}
                at = {p: 0 for p in trainers}
                updates = {}

                def call(p: str) -> None:
                    a = at[p] % (x.shape[1] - CALL)
                    updates[p] = len(trainers[p].train_on(x[:, a:a + CALL], y[:, a:a + CALL]))
                    at[p] += CALL

                runs = measure({p: (lambda _, p=p: call(p)) for p in trainers}, False, repeats)
                per_update = {p: [t / updates[p] for t in v] for p, v in runs.items()}
                lines.append(row([f"{cell} {hidden}", label, precision], per_update))
                print(lines[-1], flush=True)
    return lines


def curve_rows(epochs: int) -> list[str]:
    task = load_task("echo")
    histories, losses = {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = task.model(hidden=64, name="lstm")
        trainer = Trainer(model, task.loss_fn, torch.optim.Adam(model.parameters(), lr=1e-2), TBPTT(10, 20),
                          clip_grad_norm=1.0, precision=precision)
        histories[precision] = trainer.fit(task.train, epochs=epochs, valid=task.valid, metric=task.metric,
                                           progress=False, keep_updates=True)
        losses[precision] = [r.loss for r in histories[precision].updates if not r.skipped]
    a, b = losses["fp32"], losses["bf16"]
    worst = max(abs(p - q) / abs(p) for p, q in zip(a, b))
    lines = [f"{task.description}; {len(a)} updates per run; largest relative difference of an update's loss "
             f"(bf16 vs fp32): {worst:.2%}.", "",
             "| epoch | train loss fp32 | train loss bf16 | valid loss fp32 | valid loss bf16 | valid "
             f"{task.metric_name} fp32 | valid {task.metric_name} bf16 |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for e32, e16 in zip(histories["fp32"].epochs, histories["bf16"].epochs):
        lines.append(f"| {e32['epoch']} | {e32['train_loss']:.4f} | {e16['train_loss']:.4f} | {e32['valid_loss']:.4f} "
                     f"| {e16['valid_loss']:.4f} | {e32['valid_metric']:.4f} | {e16['valid_metric']:.4f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the tables (markdown) here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        f"Machine: {platform.machine()}, {platform.platform()}, torch {torch.__version__}, 1 thread, "
        f"{os.cpu_count()} CPUs; CPU features: {cpu_features()}.", "",
        "## Time per update",
        "",
        f"B = {BATCH}, {FEATURES} inputs and outputs, calls of {CALL} steps, recompute, SGD. Per update, in ms: "
        f"min / median / max of {args.repeats} interleaved calls (process CPU time); ratio of the medians (in "
        "brackets the range of the per-repeat ratios).",
        "",
    ]
    lines += timing_rows(args.repeats)
    lines += ["", "## Loss curves, fp32 and bf16", ""]
    lines += curve_rows(args.epochs)
    if args.out:
        atomic_write_text(args.out, "\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
