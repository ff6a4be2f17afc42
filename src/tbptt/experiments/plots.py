"""PNG plots of a sweep: validation curves with a band over seeds, gradient norms over updates, and
skill against time. Figures are built without pyplot, so nothing depends on a display."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..files import atomic_write_figure
from .summary import Row, Run, group_runs, label

_SIZE = (7.0, 4.2)
_DPI = 90


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, dpi=_DPI)
    return fig, fig.add_subplot()


def _colours(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(count)]


def _nan(values) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _stack(curves: list[np.ndarray]) -> np.ndarray:
    """Curves of different lengths side by side, padded with NaN."""
    length = max(len(c) for c in curves)
    out = np.full((len(curves), length), np.nan)
    for i, c in enumerate(curves):
        out[i, : len(c)] = c
    return out


def _finish(fig, ax, path: Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return atomic_write_figure(path, fig)


def _reduce(array: np.ndarray, fn=np.nanmean) -> np.ndarray:
    """``fn`` over seeds (axis 0), silent where every seed is NaN (the result is NaN there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(array, axis=0)


def plot_curves(runs: Sequence[Run], meta: dict, path: Path, by: str = "epoch") -> Path:
    """Validation metric per epoch: the mean over seeds, and a band from the lowest to the highest.

    ``by="backward_steps"`` puts each epoch at the backward steps spent so far (log scale), so that
    configurations are compared at equal gradient cost instead of equal data.
    """
    fig, ax = _figure()
    groups = group_runs([r for r in runs if r.get("epochs")])
    strategies = len({s for _, s in groups})
    for colour, ((config, strategy), group) in zip(_colours(len(groups)), groups.items()):
        curves = _stack([_nan(e.get("valid_metric") for e in r["epochs"]) for r in group])
        if by == "epoch":
            x = np.arange(1, curves.shape[1] + 1)
        else:
            x = _reduce(_stack([_nan(e.get(by) for e in r["epochs"]) for r in group]))
        name = label({"config": config, "strategy": strategy}, strategies)
        ax.plot(x, _reduce(curves), color=colour, label=name, marker="." if len(x) < 30 else None)
        if curves.shape[0] > 1:
            ax.fill_between(x, _reduce(curves, np.nanmin), _reduce(curves, np.nanmax),
                            color=colour, alpha=0.2, linewidth=0)
    baseline = meta.get("baseline")
    if baseline is not None and math.isfinite(baseline):
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label=f"baseline ({meta.get('baseline_name', 'trivial')})")
    if by != "epoch":
        ax.set_xscale("log")
    ax.set_xlabel("epoch" if by == "epoch" else by.replace("_", " ") + " so far")
    ax.set_ylabel(f"validation {meta.get('metric_name', 'metric')}")
    ax.set_title(f"{meta.get('task', '')}: validation {meta.get('metric_name', '')} (band: min-max over seeds)", fontsize=10)
    return _finish(fig, ax, path)


def norms_on_common_updates(group: Sequence[Run]) -> tuple[np.ndarray, np.ndarray]:
    """The seeds' gradient norms side by side: (updates, norms[seeds, updates]) on the union of
    the updates any seed recorded. Seeds may stop at different updates (a run that diverged, a time
    budget) and long runs keep a thinned record: a seed's norm between two updates it recorded is
    interpolated, and it is NaN past its last update or where it had no finite norm."""
    records = []
    for run in group:
        norms = _nan(run.get("grad_norms") or [])
        norms[~np.isfinite(norms)] = np.nan
        index = np.asarray(run.get("update_index") or np.arange(1, len(norms) + 1), dtype=float)[: len(norms)]
        records.append((index, norms))
    updates = np.unique(np.concatenate([index for index, _ in records]))
    out = np.full((len(records), len(updates)), np.nan)
    for row, (index, norms) in zip(out, records):
        known = np.isfinite(norms)
        if not known.any():
            continue
        inside = (updates >= index[0]) & (updates <= index[-1])
        row[inside] = np.interp(updates[inside], index[known], norms[known])
        row[np.searchsorted(updates, index[~known])] = np.nan  # its own gaps stay gaps
    return updates, out


def plot_grad_norms(runs: Sequence[Run], meta: dict, path: Path) -> Path:
    """Gradient norm (before clipping) of every update; the median over the seeds still running at
    that update, log scale. Updates without a gradient (no valid step) and non-finite norms leave gaps."""
    fig, ax = _figure()
    groups = group_runs([r for r in runs if r.get("grad_norms")])
    strategies = len({s for _, s in groups})
    for colour, ((config, strategy), group) in zip(_colours(len(groups)), groups.items()):
        updates, norms = norms_on_common_updates(group)
        ax.plot(updates, _reduce(norms, np.nanmedian), color=colour, linewidth=0.8,
                label=label({"config": config, "strategy": strategy}, strategies))
    ax.set_yscale("log")
    ax.set_xlabel("update")
    ax.set_ylabel("gradient norm")
    ax.set_title(f"{meta.get('task', '')}: gradient norm per update (median over the seeds still running)", fontsize=10)
    return _finish(fig, ax, path)


def plot_skill_time(rows: Sequence[Row], meta: dict, path: Path) -> Path:
    """Final validation metric (mean, bar: sd over seeds) against each run's CPU time (one thread
    per run, so this is its wall time on an idle core, and steady on a busy machine)."""
    fig, ax = _figure()
    strategies = len({r["strategy"] for r in rows})
    times = [r.get("cpu_time", math.nan) for r in rows]
    finite = [t for t in times if math.isfinite(t) and t > 0]
    for colour, row in zip(_colours(len(rows)), rows):
        x, y, err = row.get("cpu_time", math.nan), row["final_metric"], row["final_metric_std"]
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        ax.errorbar([x], [y], yerr=[err if math.isfinite(err) else 0.0], fmt="o", color=colour,
                    label=label(row, strategies), capsize=3)
        ax.annotate(label(row, strategies), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    baseline = meta.get("baseline")
    if baseline is not None and math.isfinite(baseline):
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="baseline")
    if finite and max(finite) > 20 * min(finite):
        ax.set_xscale("log")
    ax.set_xlabel("CPU seconds per run (one thread)")
    ax.set_ylabel(f"final validation {meta.get('metric_name', 'metric')}")
    ax.set_title(f"{meta.get('task', '')}: skill against time", fontsize=10)
    return _finish(fig, ax, path)


def varying_k2(runs: Sequence[Run]) -> list[Run]:
    """The runs whose updates were given different windows (ARTBP, AdaptiveTBPTT)."""
    return [r for r in runs if len({k for k in (r.get("update_k2") or []) if k is not None}) > 1]


def plot_k2(runs: Sequence[Run], meta: dict, path: Path, smooth: int = 25) -> Path:
    """The window each update was given, over training (k2 in force for AdaptiveTBPTT; ARTBP's L
    drawn as a running mean over ``smooth`` recorded updates, its draws as dots), one line per
    configuration (the median over the seeds)."""
    fig, ax = _figure()
    groups = group_runs(varying_k2(runs) or list(runs))
    strategies = len({s for _, s in groups})
    for colour, ((config, strategy), group) in zip(_colours(len(groups)), groups.items()):
        length = min(len(r["update_k2"]) for r in group)
        index = np.asarray(group[0].get("update_index") or np.arange(1, length + 1), dtype=float)[:length]
        k2 = np.nanmedian(np.stack([_nan(r["update_k2"][:length]) for r in group]), axis=0)
        name = label({"config": config, "strategy": strategy}, strategies)
        if config.startswith("ARTBP("):
            ax.plot(index, k2, ".", color=colour, markersize=2, alpha=0.3)
            kernel = np.ones(min(smooth, len(k2))) / min(smooth, len(k2))
            ax.plot(index[len(kernel) - 1:], np.convolve(k2, kernel, mode="valid"), color=colour,
                    label=f"{name} (L drawn, mean of {len(kernel)})")
        else:
            ax.step(index, k2, where="post", color=colour, label=name)
    dependency = meta.get("dependency")
    if dependency:  # a window must reach this far back for the task's signal (echo: the delay d)
        ax.axhline(dependency, color="black", linestyle="--", linewidth=1, label=f"task's dependency = {dependency}")
    ax.set_xlabel("update")
    ax.set_ylabel("window (k2 in force, or L drawn)")
    ax.set_title(f"{meta.get('task', '')}: the window of each update over training", fontsize=10)
    return _finish(fig, ax, path)


def plot_history_k2(history: Any, path: Path, name: str = "", task: str = "") -> Path:
    """``plot_k2`` for one ``History`` (``Trainer.fit``'s): the window of each update over training
    when its records were kept (``keep_updates=True``), else each epoch's mean window (``k2_mean``)."""
    if history.records is None:
        fig, ax = _figure()
        ax.plot([e["epoch"] for e in history.epochs], _nan(e.get("k2_mean") for e in history.epochs), "o-",
                label=name or "run")
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean window of the epoch's updates")
        ax.set_title(f"{task}: the window of the updates over training", fontsize=10)
        return _finish(fig, ax, path)
    k2 = history.k2()
    run = {"config": name or "run", "strategy": "", "update_k2": k2, "update_index": list(range(1, len(k2) + 1))}
    return plot_k2([run], {"task": task}, path)


def write_plots(out: Path, runs: Sequence[Run], rows: Sequence[Row], meta: dict) -> list[tuple[str, Optional[Path]]]:
    """All four PNGs in ``out`` (five when a schedule varied its window: k2 over training); (caption,
    path) pairs for the report. A figure that cannot be drawn does not stop the others: its pair is
    (caption saying why, None)."""
    out.mkdir(parents=True, exist_ok=True)
    figures = [
        ("validation curves per configuration, band over seeds", lambda p: plot_curves(runs, meta, p), "curves.png"),
        ("validation against backward steps spent (equal gradient cost)",
         lambda p: plot_curves(runs, meta, p, by="backward_steps"), "curves_backward.png"),
        ("gradient norm over updates (median over the seeds still running)",
         lambda p: plot_grad_norms(runs, meta, p), "grad_norms.png"),
        ("skill against time", lambda p: plot_skill_time(rows, meta, p), "skill_time.png"),
    ]
    if varying_k2(runs):
        figures.append(("the window of each update over training (k2 in force, or ARTBP's L drawn)",
                        lambda p: plot_k2(runs, meta, p), "k2.png"))
    images: list[tuple[str, Optional[Path]]] = []
    for caption, draw, name in figures:
        try:
            images.append((caption, draw(out / name)))
        except Exception as exc:  # one broken figure must not cost the report
            images.append((f"{caption}: could not be drawn ({type(exc).__name__}: {exc})", None))
    return images


def plot_lag_profiles(profiles: dict, path: Path, fraction: float = 0.01, dependency=None, title: str = "") -> Path:
    """Gradient norm against lag for each named ``LagProfile`` (log scale), with each one's
    recommended k2 (dotted, at the first lag a window of k2 steps drops) and, when known, the
    task's dependency length."""
    fig, ax = _figure()
    for colour, (name, profile) in zip(_colours(len(profiles)), profiles.items()):
        norms = np.asarray(profile.norms, dtype=float)
        norms[norms <= 0] = np.nan
        k2 = profile.recommend_k2(fraction)
        flag = " EXPLODING" if profile.exploding else ""
        ax.plot(profile.lags, norms, color=colour, marker=".",
                label=f"{name}: ratio/lag {profile.growth:.3g}, k2 {k2 if k2 is not None else '?'}{flag}")
        if k2 is not None:
            ax.axvline(k2, color=colour, linestyle=":", linewidth=1)
    if dependency is not None:
        ax.axvline(dependency, color="black", linestyle="--", linewidth=1, label=f"task dependency ({dependency} steps)")
    ax.set_yscale("log")
    ax.set_xlabel("lag tau (steps)")
    ax.set_ylabel("mean ||d l_t / d s_{t-tau}||")
    ax.set_title((title + "\n" if title else "gradient against lag\n")
                 + f"dotted: recommended k2; the lags a k2-step window drops (k2 on) carry <= {fraction:g} of the mass",
                 fontsize=9)
    return _finish(fig, ax, path)
