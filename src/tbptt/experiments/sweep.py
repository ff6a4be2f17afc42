"""``compare``: run a task under several configurations and seeds in parallel, and report.

Each (configuration, seed) is one ``run_one`` in a worker process (spawned, with the sweep's torch
threads, one by default; seeded from the seed alone, so a run's result does not depend on ``jobs``). Finished runs
are written to the report folder as they arrive; Ctrl-C stops the workers and keeps what finished.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue as queue_module
import signal
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..data import load_task
from ..validate import positive_int
from .plots import write_plots
from .progress import SweepProgress
from .answer import Answer, recommend
from .page import write_html
from .report import terminal_tables, write_results
from .runs import (
    Configuration,
    RunSpec,
    check_models,
    estimated_cost,
    failed_run,
    run_one,
    spec_dict,
    warm_up,
    with_model,
)
from .summary import Row, Run, summarize

_EVENTS: Any = None  # the worker's queue to the parent, set by _init_worker


def _init_worker(events: Any) -> None:
    global _EVENTS
    _EVENTS = events
    torch.set_num_threads(1)
    # Ctrl-C is the parent's to handle: it stops the workers and keeps the runs that finished
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warm_up()


def _emit(event: tuple) -> None:
    _EVENTS.put(event)


def _worker_run(spec: RunSpec) -> Run:
    _emit(("started", spec.index))
    return run_one(spec, _emit)


@dataclass
class Comparison:
    """The outcome of ``compare``: every run, one summary row per configuration, the target metric
    used for time-to-target, where the report is (None when not written), its files, the figures
    that could not be drawn (with why), and the ``answer`` (``tbptt.experiments.answer``): which
    configuration to use at this budget, and why."""

    meta: dict[str, Any]
    runs: list[Run]
    rows: list[Row]
    target: Optional[float]
    report: Optional[Path] = None
    interrupted: bool = False
    files: list[Path] = field(default_factory=list)
    figure_errors: list[str] = field(default_factory=list)
    answer: Optional[Answer] = None

    def tables(self):
        """The rich tables (skill, stability, speed) to print."""
        return terminal_tables(self.rows, self.meta)


def _specs(task: str, configs: Sequence[str], seeds: Union[int, Sequence[int]], options: dict) -> list[RunSpec]:
    if isinstance(configs, str):
        raise TypeError(f"configs must be a list of configurations like ['n,n', '10,40']; got the string {configs!r}")
    if not configs:
        raise ValueError("configs is empty; give at least one configuration, e.g. ['20,20', '10,40']")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ValueError(f"seeds must be a positive count or a list of seeds; got {seeds!r}")
    parsed = [Configuration.parse(text) for text in configs]  # a bad one fails here, before any run
    if len({c.model or options["model"] for c in parsed}) > 1:
        # configurations that differ by model: each names its model, so labels and groups show it
        configs = [with_model(text, options["model"]) for text in configs]
    specs = []
    for config in configs:
        for seed in seed_list:
            specs.append(RunSpec(task=task, config=config, seed=seed, index=len(specs), **options))
    return specs


def _plan(task: str, configs: Sequence[str], seeds: Union[int, Sequence[int]],
          options: dict) -> tuple[list[RunSpec], dict[str, Any]]:
    """The runs of a sweep and what describes it. The lag probe is for the answer's "why" on a task
    whose dependency length is unknown, and one seed's runs suffice for it."""
    if options["epochs"] is None and options["budget"] is None:
        options = {**options, "epochs": 10}
    specs = _specs(task, configs, seeds, options)
    check_models(specs)  # a user's model file that fails to import or build fails here, before any run
    meta = _meta(task, specs, options)
    first = min(s.seed for s in specs)
    specs = [s if s.probe_lags is None or (meta["dependency"] is None and s.seed == first)
             else replace(s, probe_lags=None) for s in specs]
    return specs, meta


def _meta(task_name: str, specs: list[RunSpec], options: dict) -> dict[str, Any]:
    task = load_task(task_name, **dict(specs[0].task_options))
    settings = {k: v for k, v in spec_dict(specs[0]).items() if k not in ("config", "seed", "index", "task")}
    settings["task_options"] = dict(settings["task_options"])
    settings["seeds"] = sorted({s.seed for s in specs})
    return {
        "task": task.name, "description": task.description, "metric_name": task.metric_name,
        "higher_is_better": task.higher_is_better, "baseline": task.baseline["valid"],
        "baseline_name": task.baseline_name, "dependency": task.dependency,
        "train_steps": task.train.steps, "train_streams": task.train.batch_size, "settings": settings,
    }


def compare(
    task: str,
    configs: Sequence[str],
    seeds: Union[int, Sequence[int]] = 3,
    *,
    epochs: Optional[int] = None,
    budget: Optional[str] = None,
    strategy: str = "recompute",
    hidden: int = 32,
    model: str = "lstm",
    lr: float = 1e-2,
    optimizer: str = "adam",
    clip: Optional[float] = 1.0,
    segment_length: Optional[int] = None,
    max_seconds: Optional[float] = None,
    task_options: Optional[dict[str, Any]] = None,
    target: Optional[float] = None,
    jobs: Optional[int] = None,
    out: Optional[Union[str, Path]] = None,
    progress: bool = True,
    console: Any = None,
    distributed: bool = False,
    probe_lags: Optional[int] = 50, threads: int = 1,
    precision: str = "fp32",
) -> Comparison:
    """Train ``task`` under each configuration (``"K1,K2[@lr=..,clip=..,strategy=..,model=..]"``) with
    each seed and summarise skill, stability and speed per configuration.

    ``model``: the model every configuration trains unless it names its own (``"10,40@model=lru"``):
    a key of ``tbptt.models.MODELS`` or ``"path/to/file.py:factory"``. When the configurations
    differ by model, each one's label names it (``"TBPTT(5,5) lru"``).

    ``seeds``: a count (seeds 0..count-1) or a list. ``threads``: torch threads per run (default 1:
    small recurrent models lose from more; benchmarks/README.md). ``jobs``: worker processes
    (default: CPU count over ``threads``, shared by this machine's ranks when distributed; at most
    one per run; 1 runs here). ``target``: the validation metric for time-to-target, in each run's
    CPU seconds (default: baseline + 90% of the best improvement seen). ``out``: the report folder
    (results.csv/json, runs.csv, PNGs, report.html), rewritten as runs finish. Ctrl-C stops the
    sweep, writes what finished and returns with ``interrupted=True``.

    ``budget``: what each run may spend, ``"epochs:N"``, ``"cpu:SECONDS"`` (of training) or
    ``"backward:STEPS"`` (``tbptt.budget``); without one, ``epochs`` epochs (default 10); with one,
    ``epochs`` caps it. ``max_seconds``: a wall-clock limit on top. ``precision``: each run's
    ``Trainer(precision=...)``. ``probe_lags``: on a task whose dependency length is unknown, the
    first seed's runs probe their trained model's gradient against lag (``gradient_vs_lag``, outside
    the budget) for the answer's "why"; None skips it.

    ``distributed``: spread the runs over the ranks of an initialised ``torch.distributed`` process
    group (e.g. started by torchrun on several machines); each rank runs its share with ``jobs``
    local workers, rank 0 gathers every run and writes the report, every rank returns the whole
    comparison. A run's result depends only on its seed: the outcome equals a local sweep's.
    """
    options = dict(epochs=epochs, budget=budget, strategy=strategy, hidden=hidden, model=model, lr=lr,
                   optimizer=optimizer, clip=clip, segment_length=segment_length, max_seconds=max_seconds,
                   probe_lags=probe_lags, precision=precision, threads=threads,
                   task_options=tuple(sorted((task_options or {}).items())))
    specs, meta = _plan(task, configs, seeds, options)
    jobs = default_jobs(distributed, threads) if jobs is None else positive_int(jobs, "jobs", "worker processes")
    rank, world = _ranks(distributed)
    # longest runs first, so that the last to finish is a short one (results keep spec order)
    ordered = sorted(specs, key=lambda s: -estimated_cost(s, meta["train_steps"]))[rank::world]
    out_path = Path(out) if out is not None and rank == 0 else None
    results: dict[int, Run] = {}
    finished = _keeper(results, out_path, meta, len(specs), target)
    names = {spec.index: f"{spec.configuration} seed {spec.seed}" for spec in ordered}
    bar = SweepProgress(progress and rank == 0, len(ordered), names, console)
    interrupted = _execute(ordered, jobs, bar, finished)
    if world > 1:
        results, interrupted = _gather(results, interrupted)
    runs = [results[i] for i in sorted(results)]
    rows, used = summarize(runs, meta["baseline"], meta["higher_is_better"], target)
    meta = {**meta, "target": used, "interrupted": interrupted, "partial": len(runs) < len(specs)}
    comparison = Comparison(meta, runs, rows, used, interrupted=interrupted, answer=recommend(rows, runs, meta))
    if out_path is not None:
        _write_report(comparison, out_path)
    return comparison


def _keeper(results: dict[int, Run], out_path: Optional[Path], meta: dict[str, Any], runs: int,
            target: Optional[float]) -> Callable[[Run], None]:
    """What to do with each finished run: keep it in ``results`` and, with ``out_path``, rewrite the
    results files with every run finished so far (of ``runs``)."""

    def finished(run: Run) -> None:
        results[run["index"]] = run
        if out_path is not None:
            done = [results[i] for i in sorted(results)]
            rows, used = summarize(done, meta["baseline"], meta["higher_is_better"], target)
            write_results(out_path, {**meta, "target": used, "partial": len(done) < runs}, rows, done)

    return finished


def _execute(specs: list[RunSpec], jobs: int, bar: SweepProgress, finished: Callable[[Run], None]) -> bool:
    """Run ``specs`` (in this process, or in up to ``jobs`` workers); True if Ctrl-C stopped it."""
    with bar:
        try:
            if min(jobs, len(specs)) <= 1:
                _run_here(specs, bar, finished)
            else:
                _run_pool(specs, min(jobs, len(specs)), bar, finished)
        except KeyboardInterrupt:
            return True
    return False


def _write_report(comparison: Comparison, out: Path) -> None:
    """The report folder of a finished (or interrupted) comparison: results, plots and report.html."""
    meta, runs, rows = comparison.meta, comparison.runs, comparison.rows
    write_results(out, meta, rows, runs)
    images = write_plots(out, runs, rows, meta) if runs else []
    comparison.report = write_html(out, meta, rows, images, comparison.answer)
    comparison.files = [out / n for n in ("results.json", "results.csv", "runs.csv")]
    comparison.files += [p for _, p in images if p is not None]
    comparison.figure_errors = [caption for caption, p in images if p is None]


def default_jobs(distributed: bool = False, threads: int = 1) -> int:
    """Worker processes when none are asked for: one per ``threads`` CPUs, shared among the ranks
    torchrun started on this machine (``LOCAL_WORLD_SIZE``) when the sweep is distributed."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed else 1
    return max(1, mp.cpu_count() // max(1, ranks_here) // max(1, threads))


def _ranks(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group: launch with "
            "torchrun and `tbptt compare --distributed`, or call torch.distributed.init_process_group first"
        )
    return dist.get_rank(), dist.get_world_size()


def _gather(results: dict[int, Run], interrupted: bool) -> tuple[dict[int, Run], bool]:
    """Every rank's finished runs, on every rank (the group's timeout bounds the wait)."""
    import torch.distributed as dist

    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, (results, interrupted))
    merged: dict[int, Run] = {}
    for runs, _ in shares:
        merged.update(runs)
    return merged, any(flag for _, flag in shares)


def _run_here(specs: list[RunSpec], bar: SweepProgress, finished) -> None:
    for spec in specs:
        bar.run_started(spec.index)
        run = run_one(spec, bar.event)
        finished(run)
        bar.run_done(spec.index, run_summary(run))


def _run_pool(specs: list[RunSpec], jobs: int, bar: SweepProgress, finished) -> None:
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    before = set(mp.active_children())
    executor = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(events,))
    try:
        futures = {executor.submit(_worker_run, spec): spec for spec in specs}
        pending = set(futures)
        while pending:
            try:
                bar.event(events.get(timeout=0.2))
                while True:
                    bar.event(events.get_nowait())
            except queue_module.Empty:
                bar.tick()
            for future in [f for f in pending if f.done()]:
                pending.remove(future)
                spec = futures[future]
                try:
                    run = future.result()
                except Exception as exc:  # a worker that died (killed, out of memory) fails its runs only
                    run = failed_run(spec, f"{type(exc).__name__}: {exc}")
                finished(run)
                bar.run_done(spec.index, run_summary(run))
        executor.shutdown(wait=True)
    except BaseException:
        # workers ignore SIGINT; stop them here so that an interrupted sweep ends now
        started = set(mp.active_children()) - before
        for process in started:
            process.terminate()
        for process in started:
            process.join(timeout=10)
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        events.close()


def run_summary(run: Run) -> str:
    """One line on a finished run, for a log: its configuration, seed, how it ended and its metric."""
    name = f"{run['config']} seed {run['seed']}"
    if run.get("status") == "failed":
        return f"{name} failed: {run.get('error', '')}"
    metric = run.get("final_metric", math.nan)
    ended = f", stopped by {run['stopped_by']}" if run.get("stopped_by") else ""
    return (f"{name} {run.get('status')}: validation {run.get('metric_name', 'metric')} {metric:.4g} after "
            f"{run.get('updates', 0):,} updates, {run.get('train_cpu', math.nan):.1f} CPU s of training{ended}")


def summary_line(comparison: Comparison) -> str:
    """Which configuration to use: the best by final validation metric, and the one that reached
    the target in every run soonest, in CPU seconds to the target (mean over seeds)."""
    rows = [r for r in comparison.rows if math.isfinite(r["final_metric"])]
    if not rows:
        return "no configuration finished"
    meta = comparison.meta
    pick = max if meta["higher_is_better"] else min
    best = pick(rows, key=lambda r: r["final_metric"])
    line = (f"best final validation {meta['metric_name']}: {best['config']} ({best['final_metric']:.4g}, "
            f"{best['cpu_time']:.1f} CPU s per run; baseline {meta['baseline']:.4g})")
    reliable = [r for r in rows if r["runs"] - r["failed"] > 0 and r["reached_target"] == r["runs"] - r["failed"]
                and math.isfinite(r["time_to_target"])]
    if comparison.target is not None and reliable:
        soonest = min(reliable, key=lambda r: r["time_to_target"])
        goal = f"{meta['metric_name']} {comparison.target:.4g} in every run"
        seconds = f"{soonest['time_to_target']:.1f} CPU s to target"
        if soonest is best:
            line += f"; it was also the soonest to reach {goal} ({seconds})"
        else:
            line += f"; soonest to reach {goal}: {soonest['config']} ({seconds})"
    return line
