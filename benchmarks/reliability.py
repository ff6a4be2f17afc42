"""What the reliability checks of issue 13 cost, measured side by side in one run.

- ``hash``: saving and loading a checkpoint with its SHA-256 (``tbptt.checkpoint``) against the same
  payload written by ``torch.save`` through the same atomic writer and read by ``torch.load``;
- ``step``: an update with the post-step check (weights and optimizer state copied before the
  step, one fused finiteness check of the weights after it, one host sync) against the update
  without them (``Unguarded`` below: the loss and gradient check alone, as before issue 13);
- ``history``: checkpoint size and save time after N updates (``--updates 1000,100000``); run it
  under an older tbptt (``PYTHONPATH=old/src``) for the figures before.

Process CPU time on one thread, arms interleaved, median of ``--repeats`` with the spread
(min-max of the ratios). Run: ``python benchmarks/reliability.py [hash] [step] [history]``.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tbptt
from tbptt import checkpoint as ckpt
from tbptt.files import atomic_write
from tbptt.records import History, UpdateRecord


def _timed(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def _ratios(arms: dict, repeats: int) -> dict:
    """Interleaved repeats of each arm: {name: [seconds...]}."""
    times: dict = {name: [] for name in arms}
    for fn in arms.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in arms.items():
            times[name].append(_timed(fn))
    return times


def _spread(a: list, b: list) -> str:
    ratios = sorted(x / y for x, y in zip(a, b))
    return f"{statistics.median(ratios):.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f})"


# ----------------------------------------------------------------------------------------------
def _payload(hidden: int, inputs: int) -> dict:
    model = tbptt.RecurrentNet(inputs, hidden, inputs)
    trainer = tbptt.Trainer(model, lambda o, t: ((o - t) ** 2).mean(-1), torch.optim.Adam(model.parameters()),
                            tbptt.TBPTT(8, 8))
    x = torch.randn(4, 16, inputs)
    trainer.train_on(x, x)
    return trainer.state_dict()


def bench_hash(repeats: int) -> None:
    print("checkpoint save+load: with SHA-256 (tbptt.checkpoint) / plain torch.save + torch.load, same atomic writer")
    with tempfile.TemporaryDirectory() as folder:
        for hidden, inputs in ((32, 1), (256, 32), (1024, 64)):
            payload = _payload(hidden, inputs)
            a, b = Path(folder) / "hashed.pt", Path(folder) / "plain.pt"
            arms = {
                "hashed save": lambda: ckpt.save(payload, a),
                "plain save": lambda: atomic_write(b, lambda f: torch.save(payload, f)),
                "hashed load": lambda: ckpt.load(a),
                "plain load": lambda: torch.load(b, weights_only=True),
            }
            t = _ratios(arms, repeats)
            size = a.stat().st_size
            print(f"  LSTM({inputs}, {hidden}), {size / 2**20:.2f} MiB: save {statistics.median(t['hashed save']) * 1e3:.2f} ms"
                  f" vs {statistics.median(t['plain save']) * 1e3:.2f} ms, ratio {_spread(t['hashed save'], t['plain save'])};"
                  f" load {statistics.median(t['hashed load']) * 1e3:.2f} ms vs {statistics.median(t['plain load']) * 1e3:.2f}"
                  f" ms, ratio {_spread(t['hashed load'], t['plain load'])}")


# ----------------------------------------------------------------------------------------------
class Unguarded(tbptt.Trainer):
    """The update as it was before issue 13: loss and gradient checked (one host sync), then the
    optimizer's step, with nothing copied before it and nothing checked after it."""

    def _apply(self, result, started):
        from tbptt.trainer import total_norm

        result = self.reduce(result)
        named = self.engine.named_parameters()
        grads = [result.grads[n] for n, _ in named if result.grads[n] is not None]
        norm = total_norm(grads).to(result.loss.device)
        loss, norm_value, valid = torch.stack([result.loss.float(), norm.float(),
                                               result.valid_steps.float().to(result.loss.device)]).tolist()
        u = result.update
        if not (math.isfinite(loss) and math.isfinite(norm_value)) or valid == 0:
            self.updates_skipped += 1
            return UpdateRecord(u.start, u.loss_start, u.stop, loss, norm_value, 0.0, True, "skipped")
        scale = 1.0 if self.clip_grad_norm is None else min(1.0, self.clip_grad_norm / (norm_value + 1e-6))
        for name, p in named:
            g = result.grads[name]
            p.grad = None if g is None else (g if scale == 1.0 else g * scale).to(p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates_applied += 1
        return UpdateRecord(u.start, u.loss_start, u.stop, loss, norm_value, time.perf_counter() - started)


def bench_step(repeats: int, k: int) -> None:
    print(f"an update with the post-step check and undo copy / without (TBPTT({k},{k}): an update every {k} steps)")
    for name, hidden, inputs, batch in (("small", 32, 1, 8), ("medium", 256, 32, 32)):
        x = torch.randn(batch, 256, inputs)
        trainers = {}
        for kind in (tbptt.Trainer, Unguarded):
            torch.manual_seed(0)
            model = tbptt.RecurrentNet(inputs, hidden, inputs)
            trainers[kind.__name__] = kind(model, lambda o, t: ((o - t) ** 2).mean(-1),
                                           torch.optim.Adam(model.parameters(), 1e-3), tbptt.TBPTT(k, k),
                                           clip_grad_norm=1.0)
        arms = {k: (lambda t=t: t.train_on(x, x, end_of_stream=True)) for k, t in trainers.items()}
        t = _ratios(arms, repeats)
        per = statistics.median(t["Unguarded"]) / (256 // k) * 1e6
        params = sum(p.numel() for p in trainers["Trainer"].model.parameters())
        print(f"  {name}: LSTM({inputs}, {hidden}), B={batch}, {params} weights: {per:.0f} us per update without; "
              f"ratio with/without {_spread(t['Trainer'], t['Unguarded'])}")


# ----------------------------------------------------------------------------------------------
def bench_history(counts: list[int]) -> None:
    print("checkpoint of a fit after N updates (a small model; the history as fit keeps it)")
    model = tbptt.RecurrentNet(1, 32, 1)
    trainer = tbptt.Trainer(model, lambda o, t: ((o - t) ** 2).mean(-1), torch.optim.Adam(model.parameters()),
                            tbptt.TBPTT(8, 8))
    with tempfile.TemporaryDirectory() as folder:
        for n in counts:
            history = History()
            for i in range(n):
                record = UpdateRecord(i, i, i + 1, 1.0 / (i + 1), 0.5 + (i % 97) / 10, 1e-3)
                if hasattr(history, "add"):
                    history.add(record)
                else:  # before issue 13: every record kept
                    history.updates.append(record)
            payload = {**trainer.state_dict(), "history": history.state_dict()}
            path = Path(folder) / f"{n}.pt"
            seconds = _timed(lambda: ckpt.save(payload, path))
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            print(f"  {n} updates: {path.stat().st_size / 1024:.1f} KiB, saved in {seconds * 1e3:.1f} ms (CPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["hash", "step", "history"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--updates", default="1000,100000")
    parser.add_argument("--k", type=int, default=4, help="step: TBPTT(k, k), an update every k steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"tbptt {tbptt.__file__}, torch {torch.__version__}, 1 thread")
    if "hash" in args.parts:
        bench_hash(args.repeats)
    if "step" in args.parts:
        bench_step(args.repeats, args.k)
    if "history" in args.parts:
        bench_history([int(v) for v in args.updates.split(",")])


if __name__ == "__main__":
    main()
