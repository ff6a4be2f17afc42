"""PNG plots of a sweep: skill against CPU time with the Pareto front, validation curves with a band
over seeds, and gradient norms over each run's training. Figures are built without pyplot, so
nothing depends on a display; they are drawn 1200 pixels wide, for a page's full width."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..files import atomic_write_figure
from .front import curves as front_curves
from .front import pareto_front
from .summary import Row, Run, group_runs, label

_SIZE = (12.0, 4.8)
_DPI = 100


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
    # beside the plot, so that no label covers a curve or another label
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
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
    ax.set_title(f"{meta.get('task', '')}: validation {meta.get('metric_name', '')} (line: mean over seeds; "
                 "band: lowest to highest seed)", fontsize=10)
    return _finish(fig, ax, path)


def norms_by_fraction(group: Sequence[Run], grid: np.ndarray) -> np.ndarray:
    """Each seed's gradient norms on ``grid``, fractions of that seed's own updates (0 to 1): between
    two updates it recorded (long runs keep a thinned record) interpolated on a log scale, NaN before
    its first finite norm and after its last (a run that diverged). Updates without a finite norm
    are left out."""
    out = np.full((len(group), len(grid)), np.nan)
    for row, run in zip(out, group):
        norms = _nan(run.get("grad_norms") or [])
        index = np.asarray(run.get("update_index") or np.arange(1, len(norms) + 1), dtype=float)[: len(norms)]
        known = np.isfinite(norms) & (norms > 0)
        if known.sum() >= 1 and len(index):
            fraction = index / index[-1]
            row[:] = np.exp(np.interp(grid, fraction[known], np.log(norms[known])))
            row[(grid < fraction[known][0]) | (grid > fraction[known][-1])] = np.nan
    return out


def plot_grad_norms(runs: Sequence[Run], meta: dict, path: Path) -> Path:
    """One small panel per configuration: the gradient norm (before clipping) of its updates against
    the fraction of the run's updates done, so that a run of 30 updates and one of 1,500 fill the
    same width; line: median over seeds, band: min to max; dashed: the clipping threshold."""
    from matplotlib.figure import Figure

    groups = group_runs([r for r in runs if r.get("grad_norms")])
    strategies = len({s for _, s in groups})
    columns = min(4, max(1, len(groups)))
    rows = max(1, math.ceil(len(groups) / columns))
    fig = Figure(figsize=(12.0, 2.4 * rows + 0.6), dpi=_DPI)
    axes = fig.subplots(rows, columns, sharey=True, squeeze=False)
    grid = np.linspace(0.0, 1.0, 200)
    clip = meta.get("settings", {}).get("clip")
    for ax, colour, ((config, strategy), group) in zip(axes.flat, _colours(len(groups)), groups.items()):
        norms = norms_by_fraction(group, grid)
        ax.plot(grid, _reduce(norms, np.nanmedian), color=colour, linewidth=1.2)
        if len(group) > 1:
            ax.fill_between(grid, _reduce(norms, np.nanmin), _reduce(norms, np.nanmax), color=colour, alpha=0.25,
                            linewidth=0)
        if clip:
            ax.axhline(clip, color="black", linestyle="--", linewidth=0.8)
        updates = int(np.median([r.get("updates", 0) for r in group]))
        ax.set_title(f"{label({'config': config, 'strategy': strategy}, strategies)}: {updates:,} updates", fontsize=9)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("fraction of the run's updates", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("gradient norm", fontsize=9)
    fig.suptitle(f"{meta.get('task', '')}: gradient norm before clipping (median over seeds; band min-max"
                 f"{'; dashed: clip ' + format(clip, 'g') if clip else ''})", fontsize=10)
    fig.tight_layout()
    return atomic_write_figure(path, fig)


def plot_front(runs: Sequence[Run], meta: dict, path: Path) -> Path:
    """Validation metric against CPU seconds of training, each configuration's mean curve over seeds
    (a point per epoch's end, or where a budget stopped it), with the Pareto front (thick grey: the
    best metric reached with at most that many CPU seconds) and the baseline (dashed)."""
    fig, ax = _figure()
    higher = meta.get("higher_is_better", True)
    by_config = front_curves(runs)
    for colour, (name, points) in zip(_colours(len(by_config)), by_config.items()):
        if points:
            ax.plot([p.cpu for p in points], [p.metric for p in points], color=colour, label=name, linewidth=1.2,
                    marker="." if len(points) < 60 else None)
    front = pareto_front(by_config, higher)
    if front:
        xs = [p.cpu for p in front] + [max(p.cpu for ps in by_config.values() for p in ps)]
        ys = [p.metric for p in front] + [front[-1].metric]
        ax.plot(xs, ys, drawstyle="steps-post", color="grey", linewidth=5, alpha=0.35, zorder=0, label="Pareto front")
    baseline = meta.get("baseline")
    if baseline is not None and math.isfinite(baseline):
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1,
                   label=f"baseline ({meta.get('baseline_name', 'trivial')})")
    times = [p.cpu for ps in by_config.values() for p in ps if p.cpu > 0]
    if times and max(times) > 20 * min(times):
        ax.set_xscale("log")
    ax.set_xlabel("CPU seconds of training (one thread; validation not counted)")
    ax.set_ylabel(f"validation {meta.get('metric_name', 'metric')}")
    ax.set_title(f"{meta.get('task', '')}: skill against CPU time, mean over seeds", fontsize=10)
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


FIGURES = {
    "front.png": "Skill against CPU time. Each line is a configuration's validation metric, averaged over seeds, "
    "at the end of each epoch (and where its budget stopped it), against the CPU seconds of training spent by then "
    "(one thread; validation not counted). The thick grey line is the Pareto front: the best metric any "
    "configuration had reached with at most that much CPU time. Dashed: the trivial baseline.",
    "curves.png": "Validation metric per epoch. Line: mean over seeds; band: from the lowest to the highest seed. "
    "Under a CPU budget the configurations run different numbers of epochs. Dashed: the trivial baseline.",
    "curves_backward.png": "Validation metric against the backward steps spent so far (log scale): the "
    "configurations compared at equal gradient cost. Line: mean over seeds; band: lowest to highest seed.",
    "grad_norms.png": "Gradient norm of every update before clipping, one panel per configuration, against the "
    "fraction of the run's updates done (so a run of 30 updates and one of 1,500 fill the same width). Line: "
    "median over seeds; band: lowest to highest seed; dashed: the clipping threshold. A rising curve or spikes "
    "mean instability; norms far below the threshold, a gradient that vanishes.",
}
K2_FIGURE = ("k2.png", "The window each update was given, over training: the k2 in force for AdaptiveTBPTT (a step "
             "line), ARTBP's L drawn (dots, and their running mean), the median over seeds; dashed: the task's "
             "dependency length, where known. Drawn when a schedule varied its windows.")


def write_plots(out: Path, runs: Sequence[Run], rows: Sequence[Row], meta: dict) -> list[tuple[str, Optional[Path]]]:
    """All four PNGs in ``out`` (``FIGURES`` names them and says what each shows; a fifth, ``K2_FIGURE``,
    when a schedule varied its windows); (caption, path) pairs for the report. A figure that cannot
    be drawn does not stop the others: its pair is (caption saying why, None)."""
    out.mkdir(parents=True, exist_ok=True)
    draw = {
        "front.png": lambda p: plot_front(runs, meta, p),
        "curves.png": lambda p: plot_curves(runs, meta, p),
        "curves_backward.png": lambda p: plot_curves(runs, meta, p, by="backward_steps"),
        "grad_norms.png": lambda p: plot_grad_norms(runs, meta, p),
        K2_FIGURE[0]: lambda p: plot_k2(runs, meta, p),
    }
    figures = {**FIGURES, **(dict([K2_FIGURE]) if varying_k2(runs) else {})}
    images: list[tuple[str, Optional[Path]]] = []
    for name, caption in figures.items():
        try:
            images.append((caption, draw[name](out / name)))
        except Exception as exc:  # one broken figure must not cost the report
            images.append((f"{caption} It could not be drawn ({type(exc).__name__}: {exc})", None))
    return images


def plot_lag_profiles(profiles: dict, path: Path, fraction: float = 0.01, dependency=None, title: str = "",
                      roles: Optional[dict] = None) -> Path:
    """Gradient norm against lag for each named ``LagProfile`` (log scale), with each one's
    recommended k2 (dotted, at the first lag a window of k2 steps drops, labelled with its role
    from ``roles``, e.g. "use this") and, when known, the task's dependency length."""
    fig, ax = _figure()
    roles = roles or {}
    for i, (colour, (name, profile)) in enumerate(zip(_colours(len(profiles)), profiles.items())):
        norms = np.asarray(profile.norms, dtype=float)
        norms[norms <= 0] = np.nan
        k2 = profile.recommend_k2(fraction)
        flag = " EXPLODING" if profile.exploding else ""
        role = f" ({roles[name]})" if name in roles else ""
        ax.plot(profile.lags, norms, color=colour, marker=".",
                label=f"{name}: ratio/lag {profile.growth:.3g}, k2 {k2 if k2 is not None else '?'}{role}{flag}")
        if k2 is not None:
            ax.axvline(k2, color=colour, linestyle=":", linewidth=1.5)
            ax.annotate(f"k2 = {k2}{role}", (k2, 1.0), xycoords=("data", "axes fraction"), xytext=(4, -14 - 14 * i),
                        textcoords="offset points", color=colour, fontsize=9)
    if dependency is not None:
        ax.axvline(dependency, color="black", linestyle="--", linewidth=1, label=f"task dependency ({dependency} steps)")
    ax.set_yscale("log")
    ax.set_xlabel("lag tau (steps)")
    ax.set_ylabel("mean ||d l_t / d s_{t-tau}||")
    ax.set_title((title + "\n" if title else "gradient against lag\n")
                 + f"dotted: recommended k2; the lags a k2-step window drops (k2 on) carry <= {fraction:g} of the mass",
                 fontsize=9)
    return _finish(fig, ax, path)
