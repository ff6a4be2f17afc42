"""How the cost of one fused nn.LSTM call depends on its length T, with and without a graph.

Every cut the engine makes in a window (block boundaries, saved states, checkpoint segments) turns
one fused call into two; this measures what a call costs beyond its steps. Run:
    python benchmarks/call_length.py [--hidden 256] [--batch 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1024, help="steps timed per length, in calls of T")
    parser.add_argument("--lengths", default="1,4,16,64,256,1024")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = torch.device(args.device)
    lstm = torch.nn.LSTM(args.inputs, args.hidden, batch_first=True).to(device)
    x = torch.randn(args.batch, args.steps, args.inputs, device=device)
    timer = time.process_time if device.type == "cpu" else time.perf_counter

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def forward_backward(length: int, grad: bool) -> None:
        for s in range(0, args.steps, length):
            with torch.set_grad_enabled(grad):
                out, _ = lstm(x[:, s:s + length])
            if grad:
                out.sum().backward()

    print(f"nn.LSTM({args.inputs}, {args.hidden}), B={args.batch}, {args.steps} steps in calls of T, "
          f"{'process CPU' if device.type == 'cpu' else 'wall'} time per step (median of {args.repeats})")
    print(f"{'T':>6} {'fwd, no graph':>14} {'fwd+bwd':>10}")
    for length in (int(v) for v in args.lengths.split(",")):
        row = []
        for grad in (False, True):
            forward_backward(length, grad)
            runs = []
            for _ in range(args.repeats):
                sync()
                start = timer()
                forward_backward(length, grad)
                sync()
                runs.append(timer() - start)
            row.append(statistics.median(runs) / args.steps * 1e6)
        print(f"{length:>6} {row[0]:>11.1f} us {row[1]:>7.1f} us")


if __name__ == "__main__":
    main()
