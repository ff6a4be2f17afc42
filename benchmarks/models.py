"""The built-in scan models: each recurrence's parallel scan against a plain per-step loop, and
each whole model in one call against T calls of one step.

Recurrences: each row runs ``h_t = a_t * h_{t-1} + b_t`` of one model, with that model's shapes
and coefficients drawn as at its initialisation, two ways: the scan the model uses
(``tbptt.models.scan``) and a Python loop over the steps (``h = a_t * h + b_t`` over ``unbind(1)``,
the outputs stacked). Both start from the same inputs (MinGRU: ``log a``, ``log b``; the loop takes
their ``exp`` inside the timed region) and the same carried ``h0``; "fwd+bwd" adds the backward of a
fixed projection of every ``h_t`` to the inputs and ``h0``. The projections around the recurrence
are the same in both and left out. The last column is the float32 error at the longest T: the
largest ``|h - h_float64_loop|`` over ``max |h|``, for the scan and for the float32 loop.

Whole models: ``model(x)`` against ``model(x[:, t:t+1], state)`` for every t, the outputs
concatenated; "fwd+bwd" adds ``y.mean().backward()``. Run:

    python benchmarks/models.py [--repeats 5] [--lengths 64,512,2048] [--no-models] [--out benchmarks/results/models-cpu.md]

One thread, process CPU time; the two arms alternate (order flipped every repeat) after one
warm-up each; the ratio is first / second arm of the medians, in brackets the range of the
per-repeat ratios.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import tbptt
from tbptt.files import atomic_write_text
from tbptt.models.scan import linear_scan, log_scan

Case = dict  # {"inputs": [tensors], "h0": tensor, "scan": fn(inputs, h0), "loop": fn(inputs, h0)}


def loop(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The recurrence one step at a time."""
    h, out = h0, []
    for a_t, b_t in zip(a.expand_as(b).unbind(1), b.unbind(1)):  # unbind: one backward for all steps
        h = a_t * h + b_t
        out.append(h)
    return torch.stack(out, dim=1)


def min_rnn_case(batch: int, steps: int, hidden: int, scan: str, g: torch.Generator) -> Case:
    """minGRU at initialisation: k, h~ ~ N(0, 1/3) (a Linear of unit inputs); log a = -softplus(k),
    log b = -softplus(-k) + log g(h~)."""
    k, candidate = torch.randn(2, batch, steps, hidden, generator=g) / math.sqrt(3)
    log_a = -F.softplus(k)
    log_b = -F.softplus(-k) + tbptt.models.minrnn.log_g(candidate)
    h0 = torch.rand(batch, hidden, generator=g)
    run = (lambda i, h: log_scan(i[0], i[1], h)) if scan == "log" else (lambda i, h: linear_scan(i[0].exp(), i[1].exp(), h))
    return {"inputs": [log_a, log_b], "h0": h0, "scan": run, "loop": lambda i, h: loop(i[0].exp(), i[1].exp(), h)}


def lru_case(batch: int, steps: int, state: int, g: torch.Generator) -> Case:
    """LRU at initialisation: lambda on the ring 0.9..0.999, any phase; b = gamma * (B x), complex."""
    modulus = torch.sqrt(torch.rand(state, generator=g) * (0.999**2 - 0.9**2) + 0.9**2)
    lam = torch.polar(modulus, 2 * math.pi * torch.rand(state, generator=g))
    b = torch.complex(*torch.randn(2, batch, steps, state, generator=g)) * torch.sqrt(1 - modulus**2)
    h0 = torch.complex(*torch.randn(2, batch, state, generator=g))
    return {"inputs": [lam, b], "h0": h0, "scan": lambda i, h: linear_scan(i[0], i[1], h),
            "loop": lambda i, h: loop(i[0], i[1], h)}


def mamba_case(batch: int, steps: int, channels: int, state: int, g: torch.Generator) -> Case:
    """Mamba at initialisation: delta log-uniform in [0.001, 0.1], A = -(1..N), a = exp(delta A),
    b = expm1(delta A) / A * B x with B, x ~ N(0, 1)."""
    delta = torch.exp(torch.rand(batch, steps, channels, 1, generator=g) * math.log(100) + math.log(0.001))
    A = -torch.arange(1, state + 1, dtype=torch.float32)
    b = torch.expm1(delta * A) / A * torch.randn(batch, steps, 1, state, generator=g)
    b = b * torch.randn(batch, steps, channels, 1, generator=g)
    h0 = torch.randn(batch, channels, state, generator=g)
    return {"inputs": [torch.exp(delta * A), b], "h0": h0, "scan": lambda i, h: linear_scan(i[0], i[1], h),
            "loop": lambda i, h: loop(i[0], i[1], h)}


def cases(batch: int, steps: int) -> dict[str, tuple[str, Case]]:
    g = torch.Generator().manual_seed(steps)
    return {
        "MinGRU (log-space scan)": ("[B, T, 64] real", min_rnn_case(batch, steps, 64, "log", g)),
        "MinGRU (linear scan, default)": ("[B, T, 64] real", min_rnn_case(batch, steps, 64, "linear", g)),
        "LRU": ("[B, T, 64] complex", lru_case(batch, steps, 64, g)),
        "Mamba": ("[B, T, 64, 16] real", mamba_case(batch, steps, 64, 16, g)),
    }


Arm = Callable[[bool], None]
"""One side of a comparison: run it, with the backward pass when called with True."""


def recurrence_arm(case: Case, arm: str) -> Arm:
    def run(backward: bool) -> None:
        inputs = [x.detach().requires_grad_(backward) for x in case["inputs"]]
        h0 = case["h0"].detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            h = case[arm](inputs, h0)
            if backward:  # a fixed projection of every h_t (both parts of a complex one)
                torch.autograd.grad(h.real.mean() + h.imag.mean() if h.is_complex() else h.mean(), inputs + [h0])

    return run


def model_arm(model: torch.nn.Module, x: torch.Tensor, per_step: bool) -> Arm:
    """The model over x in one call, or called once per step with its state carried."""

    def run(backward: bool) -> None:
        with torch.set_grad_enabled(backward):
            if per_step:
                state, outputs = None, []
                for x_t in x.split(1, dim=1):
                    y, state = model(x_t, state)
                    outputs.append(y)
                y = torch.cat(outputs, dim=1)
            else:
                y, _ = model(x)
            if backward:
                y.mean().backward()

    return run


def measure(arms: dict[str, Arm], backward: bool, repeats: int) -> dict[str, list[float]]:
    """Process CPU time of each arm, ``repeats`` times after a warm-up, in turns whose order flips."""
    runs: dict[str, list[float]] = {name: [] for name in arms}
    for arm in arms.values():
        arm(backward)
    for r in range(repeats):
        for name in (list(arms) if r % 2 == 0 else list(reversed(arms))):
            start = time.process_time()
            arms[name](backward)
            runs[name].append(time.process_time() - start)
    return runs


def float32_errors(case: Case) -> tuple[float, float]:
    """Largest |h - h_float64_loop| / max|h_float64_loop| for the float32 scan and float32 loop."""
    wide = [x.to(torch.complex128 if x.is_complex() else torch.float64) for x in case["inputs"]]
    h0 = case["h0"].to(torch.complex128 if case["h0"].is_complex() else torch.float64)
    with torch.no_grad():
        truth = case["loop"](wide, h0)
        scale = truth.abs().max().item()
        return tuple(
            (case[arm](case["inputs"], case["h0"]) - truth).abs().max().item() / scale for arm in ("scan", "loop")
        )


def row(cells: list[str], runs: dict[str, list[float]], after: Sequence[str] = ()) -> str:
    """A table row: the cells, each arm's min / median / max (ms), the ratio first / second, ``after``."""
    first, second = runs.values()
    ratios = [a / b for a, b in zip(first, second)]
    ratio = statistics.median(first) / statistics.median(second)
    timings = [" / ".join(f"{v * 1e3:.2f}" for v in (min(r), statistics.median(r), max(r))) for r in (first, second)]
    return "| " + " | ".join(cells + timings + [f"{ratio:.3f} ({min(ratios):.3f}-{max(ratios):.3f})", *after]) + " |"


def recurrence_table(batch: int, lengths: list[int], repeats: int, report: Callable[[str], None]) -> list[str]:
    lines = [
        "| model | h | T | pass | scan (ms) | loop (ms) | scan / loop | float32 error at T max: scan, loop |",
        "|---|---|---:|---|---|---|---:|---|",
    ]
    for steps in lengths:
        for name, (shape, case) in cases(batch, steps).items():
            errors = float32_errors(case) if steps == max(lengths) else None
            arms = {"scan": recurrence_arm(case, "scan"), "loop": recurrence_arm(case, "loop")}
            for backward in (False, True):
                error = f"{errors[0]:.1e}, {errors[1]:.1e}" if errors and not backward else ""
                cells = [name, shape, str(steps), "fwd+bwd" if backward else "fwd"]
                lines.append(row(cells, measure(arms, backward, repeats), [error]))
                report(lines[-1])
    return lines


TIMED_MODELS = {  # the recurrence shapes above: h [B, T, 64] (LRU complex), Mamba [B, T, 64, 16]
    "MinGRU": (tbptt.MinGRU, dict(n_inputs=16, hidden=64, n_outputs=16)),
    "MinLSTM": (tbptt.MinLSTM, dict(n_inputs=16, hidden=64, n_outputs=16)),
    "LRU": (tbptt.LRU, dict(n_inputs=16, hidden=64, n_outputs=16, state_size=64)),
    "Mamba": (tbptt.Mamba, dict(n_inputs=16, hidden=32, n_outputs=16, state_size=16, conv_width=4)),
}


def model_table(batch: int, lengths: list[int], repeats: int, report: Callable[[str], None]) -> list[str]:
    lines = [
        "| model | T | pass | one call (ms) | T calls of one step (ms) | one call / steps |",
        "|---|---:|---|---|---|---:|",
    ]
    for steps in lengths:
        x = torch.randn(batch, steps, 16, generator=torch.Generator().manual_seed(steps))
        for name, (cls, sizes) in TIMED_MODELS.items():
            torch.manual_seed(0)
            model = cls(**sizes)
            arms = {"call": model_arm(model, x, per_step=False), "steps": model_arm(model, x, per_step=True)}
            for backward in (False, True):
                lines.append(row([name, str(steps), "fwd+bwd" if backward else "fwd"], measure(arms, backward, repeats)))
                report(lines[-1])
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", default="64,512,2048")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the tables (markdown) here")
    parser.add_argument("--no-models", action="store_true", help="only the recurrences, not the whole models")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lengths = [int(v) for v in args.lengths.split(",")]
    head = [
        f"Machine: {platform.machine()}, {platform.platform()}, torch {torch.__version__}, 1 thread, process CPU time.",
        f"B = {args.batch}; {args.repeats} interleaved repeats after one warm-up; times in ms as min / median / max; "
        "ratio of the medians (in brackets: the range of the per-repeat ratios).",
        "",
        "## The recurrence: scan vs per-step loop",
        "",
    ]
    lines = head + recurrence_table(args.batch, lengths, args.repeats, print)
    if not args.no_models:
        lines += ["", "## The whole model: one call over T steps vs T calls of one step (state carried)", "",
                  "Sizes: " + "; ".join(f"{name}({', '.join(f'{k}={v}' for k, v in sizes.items())})"
                                        for name, (_, sizes) in TIMED_MODELS.items()) + ".", ""]
        lines += model_table(args.batch, lengths, args.repeats, print)
    if args.out:
        atomic_write_text(args.out, "\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
