"""Influence balancing (Tallec & Ollivier 2017): truncation gets the sign of a gradient wrong.

A linear system of n = 23 units driven by one parameter theta, built from the papers' description:

    s_{t+1}^i = s_t^i / 2 + s_t^{i+1} / 2 + sign_i * theta      (s^{n+1} = 0)
    sign_i = +1 for the first p = 10 units, -1 for the other 13;  loss_t = (s_t^1 - 1)^2 / 2

theta reaches unit 1 at once through the positive units and, 10 to 23 steps later, through the
negative ones. At the fixed point s^1 = 2 theta (p - (n - p)) = -6 theta, so the optimum is
theta* = -1/6. A window of 10 steps sees only the positive influence (d s^1 / d theta = +10 instead of
-6): TBPTT(10, 10) steps theta the wrong way and drifts off; windows that reach the negative units
(TBPTT(10, 60)) or an unbiased estimate of the whole gradient (ARTBP) converge.

    python docs/gallery/influence_balancing.py --out docs/gallery        # figures and numbers
    python docs/gallery/influence_balancing.py --quick                    # a short check

Everything runs through tbptt.Trainer and tbptt.truncated_gradients, one thread, float64.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

import tbptt

THETA_STAR = -1 / 6


class InfluenceBalancing(nn.Module):
    """The system above, ``model(inputs[B, T, 1], state[B, n]) -> (s^1 after each step [B, T, 1], state)``.

    The T steps of a call are computed in closed form, ``s_t = A^t s_0 + (A^0 + ... + A^(t-1)) c``
    with ``c = sign * theta``, from powers of A computed once: one call costs a few small products
    whatever its length (up to ``longest`` steps; longer calls are cut)."""

    def __init__(self, units: int = 23, positive: int = 10, theta: float = 0.0, longest: int = 1024) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(float(theta), dtype=torch.float64))
        self.register_buffer("signs", torch.tensor([1.0] * positive + [-1.0] * (units - positive), dtype=torch.float64))
        a = 0.5 * torch.eye(units, dtype=torch.float64) + 0.5 * torch.diag(torch.ones(units - 1, dtype=torch.float64), 1)
        powers, sums = [torch.eye(units, dtype=torch.float64)], [torch.zeros(units, units, dtype=torch.float64)]
        for _ in range(longest):
            sums.append(sums[-1] + powers[-1])
            powers.append(a @ powers[-1])
        self.register_buffer("powers", torch.stack(powers))  # A^t
        self.register_buffer("sums", torch.stack(sums))  # A^0 + ... + A^(t-1)
        self.longest = longest

    def forward(self, x: torch.Tensor, state: torch.Tensor | None):
        s = torch.ones(x.shape[0], self.signs.numel(), dtype=torch.float64) if state is None else state
        outputs = []
        for a in range(0, x.shape[1], self.longest):
            steps = min(self.longest, x.shape[1] - a)
            drive = self.signs * self.theta
            # s_t for t = 1..steps, every unit: [B, steps, n]
            every = torch.einsum("tij,bj->bti", self.powers[1 : steps + 1], s) + torch.einsum(
                "tij,j->ti", self.sums[1 : steps + 1], drive)
            outputs.append(every[:, :, :1])
            s = every[:, -1]
        return torch.cat(outputs, dim=1), s


def per_step_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((outputs - targets) ** 2).sum(-1)


def stream(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, steps, 1, dtype=torch.float64), torch.ones(1, steps, 1, dtype=torch.float64)


def train(schedule, steps: int, lr: float, seed: int = 0, chunk: int = 100) -> dict:
    """One stream of ``steps`` steps, plain SGD; theta after every ``chunk`` steps, every update's
    window, CPU seconds (the adaptive schedule's measurements apart)."""
    torch.manual_seed(seed)
    model = InfluenceBalancing()
    trainer = tbptt.Trainer(model, per_step_loss, torch.optim.SGD(model.parameters(), lr=lr), schedule)
    x, y = stream(chunk)
    thetas, windows = [float(model.theta.detach())], []
    started = time.process_time()
    for _ in range(steps // chunk):
        records = trainer.train_on(x, y)
        windows += [r.k2 for r in records]
        thetas.append(float(model.theta.detach()))
        if not math.isfinite(thetas[-1]) or abs(thetas[-1]) > 1e6:
            break  # drifted off: the rest is overflow
    cpu = time.process_time() - started
    return {"schedule": str(schedule), "thetas": thetas, "windows": windows, "cpu": cpu,
            "measure_cpu": trainer.engine.measure_seconds, "chunk": chunk,
            "measurements": getattr(trainer.engine.plan, "measurements", [])}


def stationary_state(theta: float) -> torch.Tensor:
    """The fixed point of the system for ``theta``: s = (I - A)^-1 sign theta."""
    model = InfluenceBalancing(theta=theta)
    a = model.powers[1]
    return torch.linalg.solve(torch.eye(a.shape[0], dtype=torch.float64) - a, model.signs * theta)[None]


def step_contributions(theta: float, k1: int, reach: int) -> torch.Tensor:
    """At the fixed point of ``theta``: the gradient of one block's loss through the weights' use j
    steps before the block, j = 1..reach (each step given its own copy of theta), and the block's own."""
    model = InfluenceBalancing(theta=theta)
    s = stationary_state(theta)
    copies = [model.theta.detach().clone().requires_grad_(True) for _ in range(reach + k1)]
    total = 0.0
    for i, weight in enumerate(copies):
        out, s = functional_call(model, {"theta": weight}, (torch.zeros(1, 1, 1, dtype=torch.float64), s))
        if i >= reach:
            total = total + per_step_loss(out, torch.ones_like(out)).sum() / k1
    grads = torch.autograd.grad(total, copies)
    before = torch.stack([grads[reach - j] for j in range(1, reach + 1)])  # j = 1..reach
    return torch.cat([sum(grads[reach:]).reshape(1), before])


def artbp_spread(mean_k2: float, k1: int = 10, theta: float = 0.0, draws: int = 400, reach: int = 400) -> dict:
    """ARTBP(k1, mean_k2)'s estimate of one update's gradient at the fixed point of ``theta``: the
    exact standard deviation over J's law (from the per-step terms g_j: Var = sum_jk (q^-min(j,k) - 1)
    g_j g_k) and the sample one over ``draws`` updates of the engine (at fixed weights and state every
    update is the same block, so each is an independent draw)."""
    schedule = tbptt.ARTBP(k1, mean_k2)
    q = schedule.q
    g = step_contributions(theta, k1, reach)
    exact = float(g.sum())
    j = torch.arange(1, reach + 1, dtype=torch.float64)
    weights = q ** -torch.minimum(j[:, None], j[None, :]) - 1 if q > 0 else torch.zeros(reach, reach, dtype=torch.float64)
    variance = float(g[1:] @ weights @ g[1:])
    torch.manual_seed(0)
    model = InfluenceBalancing(theta=theta)
    x, y = stream(k1 * draws + reach)
    grads = tbptt.truncated_gradients(model, per_step_loss, x, y, schedule, state=stationary_state(theta))
    sample = torch.stack([d["theta"] for d in grads[reach // k1:]])  # past the stream's start
    return {"mean_k2": mean_k2, "q": q, "exact": exact, "std": math.sqrt(max(variance, 0.0)),
            "sample_mean": float(sample.mean()), "sample_std": float(sample.std()), "draws": len(sample)}


# ----------------------------------------------------------------------------------------------
def plot_training(runs: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), dpi=90)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for run in runs:
        steps = [i * run["chunk"] for i in range(len(run["thetas"]))]
        left.plot(steps, [max(abs(t - THETA_STAR), 1e-16) for t in run["thetas"]], label=run["schedule"])
    left.set_yscale("log")
    left.set_xlabel("stream step")
    left.set_ylabel("|theta - theta*|, theta* = -1/6")
    left.set_title("distance to the optimum over training (SGD, lr 1e-3)", fontsize=10)
    left.legend(fontsize=8)
    for run in runs:
        if run["schedule"].startswith(("ARTBP", "Adaptive")):
            window = run["windows"]
            if run["schedule"].startswith("ARTBP"):
                width = 50
                window = [sum(window[i : i + width]) / width for i in range(0, len(window) - width + 1)]
            right.plot(range(1, len(window) + 1), window, label=run["schedule"] + (
                " (L drawn, mean of 50)" if run["schedule"].startswith("ARTBP") else " (k2 in force)"))
    right.set_xlabel("update")
    right.set_ylabel("window")
    right.set_title("the window each update was given", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def plot_spread(spreads: list[dict], outcomes: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), dpi=90)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    m = [s["mean_k2"] for s in spreads]
    left.plot(m, [s["std"] / abs(s["exact"]) for s in spreads], "-", label="exact, over the law of J")
    left.plot(m, [s["sample_std"] / abs(s["exact"]) for s in spreads], "o", label="sample, engine's draws")
    left.set_yscale("log")
    left.set_xlabel("mean_k2 (k1 = 10)")
    left.set_ylabel("sd of one update's gradient / |its mean|")
    left.set_title("ARTBP(10, mean_k2): spread of the estimate", fontsize=10)
    left.legend(fontsize=8)
    for mean_k2, finals in outcomes.items():
        right.plot([mean_k2] * len(finals), [abs(v - THETA_STAR) if math.isfinite(v) else 1e6 for v in finals], "o",
                   color="tab:blue")
    right.set_yscale("log")
    right.set_xlabel("mean_k2 (k1 = 10)")
    right.set_ylabel("|theta - theta*| at the end (1e6: drifted off)")
    right.set_title("ARTBP(10, mean_k2) after training, one dot per seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="influence-balancing", help="folder for the figures and numbers")
    parser.add_argument("--steps", type=int, default=20000, help="stream steps per training run")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--quick", action="store_true", help="short runs, few draws (a check, not the figures)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps, draws = (2000, 50) if args.quick else (args.steps, 400)
    schedules = [tbptt.TBPTT(10, 10), tbptt.TBPTT(10, 60), tbptt.ARTBP(10, 30), tbptt.AdaptiveTBPTT(10)]
    runs = [train(s, steps, args.lr) for s in schedules]
    spreads = [artbp_spread(m, draws=draws) for m in (11, 12, 13, 15, 20, 30, 45, 60)]
    outcomes = {m: [train(tbptt.ARTBP(10, m), steps, args.lr, seed=seed)["thetas"][-1] for seed in range(3)]
                for m in (11, 12, 13, 15, 20, 30)}
    plot_training(runs, out / "influence-theta.png")
    plot_spread(spreads, outcomes, out / "influence-artbp-spread.png")
    summary = {
        "final_theta": {r["schedule"]: r["thetas"][-1] for r in runs},
        "steps_to_drift": {r["schedule"]: (len(r["thetas"]) - 1) * r["chunk"] for r in runs},
        "cpu": {r["schedule"]: r["cpu"] for r in runs},
        "adaptive": {"measurements": runs[3]["measurements"], "measure_cpu": runs[3]["measure_cpu"],
                     "measure_share": runs[3]["measure_cpu"] / runs[3]["cpu"]},
        "artbp_spread": spreads,
        "artbp_final_theta": outcomes,
        "runs": runs,
    }
    (out / "influence-balancing.json").write_text(json.dumps(summary, indent=1))
    for r in runs:
        print(f"{r['schedule']:<28} final theta {r['thetas'][-1]:+.6g} after {(len(r['thetas']) - 1) * r['chunk']} "
              f"steps, {r['cpu']:.1f} CPU s")
    print("adaptive: k2 chosen", [m["k2"] for m in runs[3]["measurements"]],
          f"measurements {runs[3]['measure_cpu']:.2f} CPU s = {100 * summary['adaptive']['measure_share']:.1f}% of training")
    for s in spreads:
        print(f"ARTBP(10,{s['mean_k2']}): q {s['q']:.3f}, gradient {s['exact']:.4f}, sd exact {s['std']:.4g}, "
              f"sample mean {s['sample_mean']:.4f} sd {s['sample_std']:.4g} ({s['draws']} draws)")
    for m, finals in outcomes.items():
        print(f"ARTBP(10,{m}) final theta over 3 seeds: {', '.join(f'{v:+.4g}' for v in finals)}")


if __name__ == "__main__":
    main()
