"""Skill at equal CPU budget, read from a ``tbptt compare`` report's results.json.

Each run's epochs carry the CPU seconds its process had spent by the end of the epoch (one thread,
training and validation: ``cpu_elapsed``). At a budget of B seconds, a run's skill is its validation
metric at the last epoch it finished within B. The budget defaults to the smallest CPU time any run
needed for all its epochs, so that every run is compared where all of them were still going.

    python docs/gallery/equal_cpu.py echo-adaptive/results.json [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def skill_within(run: dict, budget: float) -> float:
    """The validation metric at the last epoch the run finished within ``budget`` CPU seconds."""
    reached = [e for e in run["epochs"] if e.get("cpu_elapsed", math.inf) <= budget]
    return reached[-1]["valid_metric"] if reached else math.nan


def table(results: dict, budget: float | None) -> tuple[float, list[tuple[str, float, float, float, int]]]:
    runs = [r for r in results["runs"] if r.get("status") == "ok"]
    if budget is None:
        budget = min(r["epochs"][-1]["cpu_elapsed"] for r in runs)
    rows = []
    for config in dict.fromkeys(r["config"] for r in runs):
        group = [r for r in runs if r["config"] == config]
        skills = [skill_within(r, budget) for r in group]
        epochs = [sum(e["cpu_elapsed"] <= budget for e in r["epochs"]) for r in group]
        rows.append((config, statistics.fmean(skills), statistics.stdev(skills) if len(skills) > 1 else 0.0,
                     statistics.fmean(r["cpu_time"] for r in group), round(statistics.fmean(epochs))))
    return budget, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--budget", type=float, default=None, help="CPU seconds per run (default: the shortest run's)")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    budget, rows = table(results, args.budget)
    name = results["meta"]["metric_name"]
    print(f"at {budget:.2f} CPU s per run (one thread):\n")
    print(f"| configuration | {name} within the budget (mean ± sd over seeds) | epochs done | CPU s of the whole run |")
    print("|---|---|---|---|")
    for config, mean, sd, cpu, epochs in rows:
        print(f"| {config} | {mean:.3f} ± {sd:.3f} | {epochs} | {cpu:.1f} |")
    fixed = [r for r in rows if r[0].startswith("TBPTT(")]
    best = max(fixed, key=lambda r: r[1])
    sweep = sum(r[3] for r in fixed) * len({r["seed"] for r in results["runs"]})
    print(f"\nbest fixed configuration at this budget: {best[0]} ({best[1]:.3f}); the sweep over "
          f"{len(fixed)} fixed configurations cost {sweep:.0f} CPU s in all")


if __name__ == "__main__":
    main()
