"""The benchmark suite: tbptt's Trainer against hand-written loops and least-work bounds, side by side.

Every row times two contenders in the same process, interleaved, on the same LSTM (``RecurrentNet``:
nn.LSTM + linear head), the same data, the same initial weights and the same optimizer (plain SGD,
so the optimizer adds as little as possible and engine overhead shows). A contender's time is the
median of ``repeats`` runs over a whole stream after ``warmup`` runs, by process CPU time on one
CPU thread and by synchronised wall time on CUDA (``BenchConfig.timer``); setup (model copy,
optimizer, trainer) is outside the timer. The ratio is always ours / reference.
``benchmarks/README.md`` explains each row.

Peak memory of a run is the most memory its tensors held at once above the level before it: on
CUDA ``torch.cuda.max_memory_allocated``; on CPU the running sum of the CPU allocator's
allocations and frees that ``torch.profiler`` records (everything: activations, gradients, weight
snapshots, temporaries, checkpointed segments).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator, Optional

import torch
from torch.profiler import ProfilerActivity, profile

from ._bench_jobs import (
    Job,
    Workload,
    cell_recipe_job,
    checkpoint_option,
    detach_loop_job,
    recompute_bound_job,
    stored_bound_job,
    trainer_job,
)
from .schedule import TBPTT


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run. ``k``: TBPTT(k, k); ``k1 < k2``: the overlapping rows;
    ``long_n``: the stream of the TBPTT(n, n) rows; ``memory_ns``/``memory_k2s``: the streams and
    window lengths of the memory rows (at ``k1``); ``clock``: see ``timer``."""

    batch: int = 32
    inputs: int = 32
    hidden: int = 256
    outputs: int = 32
    n: int = 1000
    k: int = 32
    k1: int = 16
    k2: int = 64
    long_n: int = 1000
    memory_ns: tuple[int, ...] = (1000, 10000)
    memory_k2s: tuple[int, ...] = (32, 64, 128)
    repeats: int = 7
    warmup: int = 1
    threads: int = 1
    device: str = "cpu"
    clock: str = "auto"
    seed: int = 0
    lr: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("batch", "inputs", "hidden", "outputs", "n", "k", "k1", "k2", "long_n", "repeats", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BenchConfig.{name} must be a positive int; got {value!r}")
        if self.warmup < 0:
            raise ValueError(f"BenchConfig.warmup must be >= 0; got {self.warmup!r}")
        if not self.k1 < self.k2:
            raise ValueError(f"the overlapping rows need k1 < k2; got k1={self.k1}, k2={self.k2}")
        if len(self.memory_ns) < 2 or any(not isinstance(v, int) or v < 1 for v in self.memory_ns):
            raise ValueError(f"memory_ns must hold at least two positive stream lengths; got {self.memory_ns!r}")
        if any(not isinstance(v, int) or v < 1 for v in self.memory_k2s) or not self.memory_k2s:
            raise ValueError(f"memory_k2s must hold positive window lengths; got {self.memory_k2s!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda'; got {self.device!r}")
        if self.clock not in ("auto", "wall", "cpu"):
            raise ValueError(f"clock must be 'auto', 'wall' or 'cpu'; got {self.clock!r}")
        if self.clock == "cpu" and self.device == "cuda":
            raise ValueError("clock 'cpu' cannot time CUDA work (it runs asynchronously); use 'wall' or 'auto'")

    @property
    def timer(self) -> Callable[[], float]:
        """The clock runs are timed with. ``auto``: this process's CPU time on one CPU thread (the
        work itself, whatever else a shared machine runs), wall time otherwise (CUDA: synchronised)."""
        if self.clock == "wall" or (self.clock == "auto" and (self.device == "cuda" or self.threads > 1)):
            return time.perf_counter
        return time.process_time


PRESETS = {
    # CI-sized: about 20 s on one CPU thread; memory rows on streams of 500 and 5000 steps
    "quick": BenchConfig(batch=16, inputs=16, hidden=64, outputs=16, n=512, k=32, k1=16, k2=64,
                         long_n=512, memory_ns=(500, 5000), memory_k2s=(32, 64, 128), repeats=3),
    # the README table
    "full": BenchConfig(),
}


@dataclass(frozen=True)
class Target:
    """A bound on a ratio: ``ratio <= value`` or ``ratio >= value``."""

    op: str
    value: float
    label: str

    def met(self, ratio: Optional[float]) -> Optional[bool]:
        if ratio is None or not math.isfinite(ratio):
            return None
        return ratio <= self.value if self.op == "<=" else ratio >= self.value


@dataclass
class Row:
    """One line of the table. ``metric`` says whether ``ratio`` compares times or peak memory."""

    configuration: str
    reference: str
    metric: str = "time"
    ours_s: Optional[float] = None
    reference_s: Optional[float] = None
    ours_bytes: Optional[int] = None
    reference_bytes: Optional[int] = None
    ratio: Optional[float] = None
    target: Optional[Target] = None
    met: Optional[bool] = None
    note: str = ""
    ours_runs: list[float] = field(default_factory=list)
    reference_runs: list[float] = field(default_factory=list)

    def finish(self) -> "Row":
        if self.ratio is None:
            pair = (self.ours_s, self.reference_s) if self.metric == "time" else (self.ours_bytes, self.reference_bytes)
            if pair[0] is not None and pair[1]:
                self.ratio = pair[0] / pair[1]
        if self.target is not None:
            self.met = self.target.met(self.ratio)
        return self


@dataclass
class BenchResult:
    """The rows of one run, its configuration and the machine it ran on."""

    config: BenchConfig
    machine: dict[str, str]
    rows: list[Row] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"config": asdict(self.config), "machine": self.machine, "rows": [asdict(r) for r in self.rows]}


def machine_info(device: str) -> dict[str, str]:
    """Where the numbers come from: CPU, threads, torch version and accelerator."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cudnn"] = str(torch.backends.cudnn.version())
    return info


# ----------------------------------------------------------------------------------------------
# measuring
def measure(work: Workload, jobs: dict[str, Job], repeats: int, warmup: int,
            timer: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each run of each job by ``timer``, the jobs interleaved (order alternating) in
    each repeat, after ``warmup`` untimed runs of each. The garbage collector is held off while a
    run is timed."""
    for _ in range(warmup):
        for job in jobs.values():
            job()[0]()
    gc.collect()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for r in range(repeats):
        names = list(jobs) if r % 2 == 0 else list(reversed(jobs))
        for name in names:
            run, _ = jobs[name]()
            gc.disable()
            try:
                work.sync()
                start = timer()
                run()
                work.sync()
                times[name].append(timer() - start)
            finally:
                gc.enable()
    return times


def peak_memory(work: Workload, job: Job) -> tuple[float, int]:
    """One run of ``job``: (seconds, peak bytes above the level before it; see the module docstring).
    The seconds include the profiler's overhead on CPU: the timed rows come from ``measure``."""
    run, _ = job()
    if work.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() - base
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.__enter__()
    try:
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    return seconds, _allocator_peak(prof)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    # some torch builds log every profiler start and stop from C++ straight to file descriptor 2
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _allocator_peak(prof: profile) -> int:
    # kineto records one "[memory]" event per CPU allocation (+bytes) and free (-bytes); the
    # FunctionEvent view folds most of them into their ops, so read the raw events
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------------------------
# the rows
def _workload(config: BenchConfig, n: int) -> Workload:
    return Workload(config.batch, config.inputs, config.hidden, config.outputs, n, config.device, config.seed, config.lr)


def _compare(config: BenchConfig, work: Workload, configuration: str, reference: str, ours: Job,
             theirs: Job, target: Optional[Target], memory: bool = False, note: str = "") -> Row:
    times = measure(work, {"ours": ours, "reference": theirs}, config.repeats, config.warmup, config.timer)
    row = Row(configuration, reference, ours_s=statistics.median(times["ours"]),
              reference_s=statistics.median(times["reference"]), target=target, note=note,
              ours_runs=times["ours"], reference_runs=times["reference"])
    if memory:
        row.ours_bytes = peak_memory(work, ours)[1]
        row.reference_bytes = peak_memory(work, theirs)[1]
    return row.finish()


def row_chunked(config: BenchConfig) -> Row:
    """TBPTT(k, k) against the hand-written chunked detach() loop."""
    work = _workload(config, config.n)
    s = TBPTT(config.k, config.k)
    return _compare(config, work, f"{s} Trainer, n={config.n}", "chunked detach() loop",
                      trainer_job(work, s), detach_loop_job(work, config.k),
                      Target("<=", 1.05, "<= 1.05"), memory=True)


def row_stored_bound(config: BenchConfig) -> Row:
    """TBPTT(k1 < k2) ``stored`` against its least work (forward once, k2-step backward per update)."""
    work = _workload(config, config.n)
    s = TBPTT(config.k1, config.k2)
    return _compare(config, work, f"{s} stored, n={config.n}",
                      "least work: fwd once (k1-step calls) + fused k2-step bwd per update",
                      trainer_job(work, s, "stored"), stored_bound_job(work, s), Target("<=", 1.15, "<= 1.15"))


def row_recompute_bound(config: BenchConfig) -> Row:
    """TBPTT(k1 < k2) ``recompute`` against one fused k2-step forward and backward per update."""
    work = _workload(config, config.n)
    s = TBPTT(config.k1, config.k2)
    return _compare(config, work, f"{s} recompute, n={config.n}", "least work: fused k2-step fwd+bwd per update",
                      trainer_job(work, s, "recompute"), recompute_bound_job(work, s),
                      Target("<=", 1.10, "<= 1.10"))


def row_cell_recipe(config: BenchConfig) -> Row:
    """TBPTT(k1 < k2) ``recompute`` against the LSTMCell loop that re-runs every window step by step."""
    work = _workload(config, config.n)
    s = TBPTT(config.k1, config.k2)
    return _compare(config, work, f"{s} recompute, n={config.n}", "hand-written LSTMCell re-run recipe",
                      trainer_job(work, s, "recompute"), cell_recipe_job(work, config.k1, config.k2),
                      Target("<=", 1 / 3, "<= 0.33 (3x faster)"))


def row_keras(config: BenchConfig) -> Row:
    """TBPTT(k, k) against Keras 3 stateful LSTM training, where Keras is importable."""
    s = TBPTT(config.k, config.k)
    configuration, reference = f"{s} Trainer, n={config.n}", "Keras 3 stateful LSTM, train_on_batch per chunk"
    if importlib.util.find_spec("keras") is None:
        return Row(configuration, reference, note="not installed (pip install keras)")
    from ._bench_jobs import keras_stateful_job

    # the same framework underneath unless the user chose another Keras backend
    os.environ.setdefault("KERAS_BACKEND", "torch")
    work = _workload(config, config.n)
    try:
        # one chunk first: Keras may import but be unable to train a stateful LSTM on its backend
        keras_stateful_job(_workload(config, config.k), config.k)()[0]()
    except Exception as exc:  # report what Keras did rather than fail the suite
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        return Row(configuration, reference,
                   note=f"keras ({os.environ['KERAS_BACKEND']} backend) failed: {type(exc).__name__}: {first}")
    return _compare(config, work, configuration, reference, trainer_job(work, s),
                    keras_stateful_job(work, config.k), None, note="ratio reported, no target")


def row_full_bptt(config: BenchConfig) -> Row:
    """TBPTT(n, n) on a long stream against one forward and backward over the whole stream."""
    work = _workload(config, config.long_n)
    return _compare(config, work, f"TBPTT(n,n) Trainer, n={config.long_n}", "one fwd+bwd over the stream",
                    trainer_job(work, TBPTT.full()), detach_loop_job(work, None),
                    Target("<=", 1.05, "<= 1.05"), memory=True)


def rows_checkpointed(config: BenchConfig) -> list[Row]:
    """TBPTT(n, n) with gradient checkpointing against TBPTT(n, n) without: time, then memory
    (Gruslys et al. 2016: about 95% less memory for about a third more time at n = 1000)."""
    segments = max(2, round(math.sqrt(config.long_n)))
    configuration = f"TBPTT(n,n) checkpoint_segments={segments}, n={config.long_n}"
    reference = "TBPTT(n,n) without checkpointing"
    option = checkpoint_option()
    if option is None:
        return [Row(configuration, reference, note="not available: StreamEngine has no checkpoint_segments option yet")]
    work = _workload(config, config.long_n)
    timed = _compare(config, work, configuration, reference, trainer_job(work, TBPTT.full(), **{option: segments}),
                     trainer_job(work, TBPTT.full()), Target("<=", 1.35, "<= 1.35"), memory=True)
    memory = Row(configuration, reference, metric="memory", ours_bytes=timed.ours_bytes,
                 reference_bytes=timed.reference_bytes, target=Target("<=", 0.10, "<= 0.10")).finish()
    return [timed, memory]


def rows_memory(config: BenchConfig) -> list[Row]:
    """Peak memory of TBPTT(k1, k2) growing with k2 (at n) and flat in n (at k2), both strategies."""
    rows = []
    for strategy in ("recompute", "stored"):
        work = _workload(config, config.n)
        base_k2 = config.memory_k2s[0]
        base = peak_memory(work, trainer_job(work, TBPTT(config.k1, base_k2), strategy))[1]
        for k2 in config.memory_k2s[1:]:
            peak = peak_memory(work, trainer_job(work, TBPTT(config.k1, k2), strategy))[1]
            rows.append(Row(f"TBPTT({config.k1},{k2}) {strategy}, n={config.n}",
                            f"TBPTT({config.k1},{base_k2})", metric="memory", ours_bytes=peak, reference_bytes=base,
                            target=Target(">=", 1.0, f"grows with k2 (~{k2 / base_k2:g})")).finish())
        s = TBPTT(config.k1, config.k2)
        small = _workload(config, config.memory_ns[0])
        base = peak_memory(small, trainer_job(small, s, strategy))[1]
        for n in config.memory_ns[1:]:
            work = _workload(config, n)
            peak = peak_memory(work, trainer_job(work, s, strategy))[1]
            rows.append(Row(f"{s} {strategy}, n={n}", f"same, n={config.memory_ns[0]}", metric="memory",
                            ours_bytes=peak, reference_bytes=base,
                            target=Target("<=", 1.05, "flat in n (<= 1.05)")).finish())
    return rows


ROWS: list[Callable[[BenchConfig], object]] = [
    row_chunked, row_stored_bound, row_recompute_bound, row_cell_recipe, row_keras,
    row_full_bptt, rows_checkpointed, rows_memory,
]


def run_suite(config: BenchConfig, progress: Optional[Callable[[str], None]] = None) -> BenchResult:
    """Every row of the table, measured in this process on ``config.device``."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False; use --device cpu")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        result = BenchResult(config, machine_info(config.device))
        for build in ROWS:
            if progress is not None:
                progress(build.__name__)
            made = build(config)
            result.rows.extend(made if isinstance(made, list) else [made])
        return result
    finally:
        torch.set_num_threads(previous_threads)


# ----------------------------------------------------------------------------------------------
# output
def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _bytes(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:.2f} MiB"


def format_markdown(result: BenchResult) -> str:
    """The table as GitHub markdown, headed by the machine and sizes it ran with."""
    c, m = result.config, result.machine
    lines = [
        f"Machine: {m['processor']}, {m['platform']}, torch {m['torch']}, {c.threads} thread(s), "
        f"device {m['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}",
        f"Model: nn.LSTM({c.inputs}, {c.hidden}) + Linear({c.hidden}, {c.outputs}), B={c.batch}, SGD; "
        f"median of {c.repeats} runs after {c.warmup} warm-up, "
        f"{'wall' if c.timer is time.perf_counter else 'process CPU'} time; ratio = ours / reference",
        "",
        "| configuration | reference | ours | reference | ratio | target | met | peak mem ours | peak mem ref | note |",
        "|---|---|---:|---:|---:|---|---|---:|---:|---|",
    ]
    for r in result.rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}" + (" (mem)" if r.metric == "memory" else "")
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(
            f"| {r.configuration} | {r.reference} | {_seconds(r.ours_s)} | {_seconds(r.reference_s)} | {ratio} | "
            f"{r.target.label if r.target else '-'} | {met} | {_bytes(r.ours_bytes)} | {_bytes(r.reference_bytes)} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def quick_config(**overrides: object) -> BenchConfig:
    """The quick preset with some sizes changed (tests use tiny ones)."""
    return replace(PRESETS["quick"], **overrides)
