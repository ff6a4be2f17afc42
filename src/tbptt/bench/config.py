"""The benchmark's sizes (``BenchConfig``, the presets), its rows and targets, and a run's result."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional

from ..validate import non_negative_int, positive_int


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
    wordlm_vocab: int = 18000
    wordlm_updates: int = 8
    small_n: int = 200
    grid_hidden: tuple[int, ...] = (64, 128, 256)
    grid_k1: tuple[int, ...] = (5, 10, 16)
    grid_mult: tuple[int, ...] = (2, 4, 8)
    grid_n: int = 480
    repeats: int = 7
    warmup: int = 1
    threads: int = 1
    device: str = "cpu"
    clock: str = "auto"
    seed: int = 0
    lr: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("batch", "inputs", "hidden", "outputs", "n", "k", "k1", "k2", "long_n", "repeats", "threads",
                     "wordlm_vocab", "wordlm_updates", "small_n", "grid_n"):
            positive_int(getattr(self, name), f"BenchConfig.{name}")
        for name in ("grid_hidden", "grid_k1", "grid_mult"):
            for value in getattr(self, name):
                positive_int(value, f"BenchConfig.{name}")
        non_negative_int(self.warmup, "BenchConfig.warmup")
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
                         long_n=512, memory_ns=(500, 5000), memory_k2s=(32, 64, 128), repeats=3,
                         wordlm_vocab=2000, wordlm_updates=4, small_n=100, grid_hidden=(64,), grid_k1=(5, 10),
                         grid_mult=(2, 4), grid_n=200),
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

    def verdict(self, ratio: Optional[float], spread: Optional[tuple[float, float]]) -> Optional[str]:
        """"yes" when the ratio meets the target; "no" when even the most favourable of the paired
        runs misses it; "noisy" when the runs' spread straddles the target, so that this run cannot
        tell (rerun on a quieter machine or with more repeats)."""
        met = self.met(ratio)
        if met is None or met:
            return None if met is None else "yes"
        if spread is not None and self.met(spread[0] if self.op == "<=" else spread[1]):
            return "noisy"
        return "no"


GRID_PAIRS = (
    ("stored", "stored bound", Target("<=", 1.15, "<= 1.15")),
    # what is ours: the engine's cost over the kernel calls the strategy must make
    ("stored", "stored floor", Target("<=", 1.15, "<= 1.15")),
    # what is the kernel's: a fused model's fixed cost per backward call, k2/k1 calls per update
    ("stored floor", "recompute bound", None),
    ("recompute", "recompute bound", Target("<=", 1.10, "<= 1.10")),
    ("stored", "recompute", Target("<=", 1.0, "<= 1.0")),
)
"""The grid's comparisons: each strategy against its least work, ``stored`` against the calls it
cannot avoid (its floor), the floor against recompute's least work, and the two strategies."""


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
    spread: Optional[tuple[float, float]] = None
    verdict: Optional[str] = None
    group: str = "main"

    def finish(self) -> "Row":
        if self.ratio is None:
            pair = (self.ours_s, self.reference_s) if self.metric == "time" else (self.ours_bytes, self.reference_bytes)
            if pair[0] is not None and pair[1]:
                self.ratio = pair[0] / pair[1]
        if self.ours_runs and len(self.ours_runs) == len(self.reference_runs):
            # runs i of both contenders ran next to each other: their ratios show the noise
            paired = [a / b for a, b in zip(self.ours_runs, self.reference_runs) if b > 0]
            if paired:
                self.spread = (min(paired), max(paired))
        if self.target is not None:
            self.met = self.target.met(self.ratio)
            self.verdict = self.target.verdict(self.ratio, self.spread)
        return self


@dataclass
class BenchResult:
    """The rows of one run, its configuration and the machine it ran on."""

    config: BenchConfig
    machine: dict[str, str]
    rows: list[Row] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"config": asdict(self.config), "machine": self.machine, "rows": [asdict(r) for r in self.rows]}



def quick_config(**overrides: object) -> BenchConfig:
    """The quick preset with some sizes changed (tests use tiny ones)."""
    return replace(PRESETS["quick"], **overrides)
