"""The rows of the table, each timing tbptt against a reference, and ``run_suite`` that makes them all."""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
from typing import Callable, Optional

import torch

from ..schedule import TBPTT
from .config import GRID_PAIRS, BenchConfig, BenchResult, Row, Target
from .jobs import (
    Job,
    cell_recipe_job,
    checkpoint_option,
    detach_loop_job,
    recompute_bound_job,
    recompute_loop_job,
    stored_bound_job,
    stored_floor_job,
    trainer_job,
)
from .measure import machine_info, measure, peak_memory
from .workloads import WordLMWorkload, Workload


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


def row_stored_floor(config: BenchConfig) -> Row:
    """TBPTT(k1 < k2) ``stored`` against the kernel calls it cannot avoid (``stored_floor_job``):
    the engine's own cost, apart from the fused model's fixed cost per backward call."""
    work = _workload(config, config.n)
    s = TBPTT(config.k1, config.k2)
    return _compare(config, work, f"{s} stored, n={config.n}",
                    "floor: fwd once + k2/k1 chained k1-step bwd calls per update",
                    trainer_job(work, s, "stored"), stored_floor_job(work, s), Target("<=", 1.15, "<= 1.15"))


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
    from .jobs import keras_stateful_job

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


def row_word_lm(config: BenchConfig) -> Row:
    """TBPTT(35, 35) on the word-LM configuration against pytorch/examples' training loop."""
    work = WordLMWorkload(vocab=config.wordlm_vocab, n=35 * config.wordlm_updates, device=config.device,
                          seed=config.seed)
    s = TBPTT(35, 35)
    return _compare(config, work, f"{s} Trainer, word LM (vocab {config.wordlm_vocab}), n={work.n}",
                    "word_language_model loop (detach, backward, clip 0.25, SGD)", trainer_job(work, s),
                    detach_loop_job(work, 35), Target("<=", 1.03, "<= 1.03"))


def rows_small_models(config: BenchConfig) -> list[Row]:
    """Fixed cost per update on a small model (hidden 32, B 16): the Trainer against a hand-written
    loop making the same updates, for an update every step and short windows."""
    work = Workload(16, 8, 32, 8, config.small_n, config.device, config.seed, config.lr)
    rows = []
    for s in (TBPTT(1, 20), TBPTT(4, 4), TBPTT(1, None)):
        reference = detach_loop_job(work, s.k1) if s.k1 == s.k2 else recompute_loop_job(work, s)
        row = _compare(config, work, f"{s} Trainer, hidden 32, B 16, n={work.n}",
                       "hand-written loop, the same updates", trainer_job(work, s), reference,
                       Target("<=", 1.2, "<= 1.2"))
        updates = len(s.updates(work.n))
        if row.ours_s is not None and row.reference_s is not None:
            row.note = f"{(row.ours_s - row.reference_s) / updates * 1e6:+.0f} us per update"
        rows.append(row)
    return rows


def rows_strategy_grid(config: BenchConfig) -> list[Row]:
    """``stored`` and ``recompute`` over hidden x k1 x k2 = m*k1: each against its least work, and
    stored against recompute (which must not be cheaper when k2 >= 2 k1)."""
    rows = []
    for hidden in config.grid_hidden:
        work = Workload(config.batch, config.inputs, hidden, config.outputs, config.grid_n, config.device,
                        config.seed, config.lr)
        for k1 in config.grid_k1:
            for mult in config.grid_mult:
                s = TBPTT(k1, mult * k1)
                times = measure(work, {"stored": trainer_job(work, s, "stored"), "stored bound": stored_bound_job(work, s),
                                       "stored floor": stored_floor_job(work, s),
                                       "recompute": trainer_job(work, s, "recompute"),
                                       "recompute bound": recompute_bound_job(work, s)},
                                config.repeats, config.warmup, config.timer)
                name = f"{s}, hidden {hidden}, n={config.grid_n}"
                for ours, theirs, target in GRID_PAIRS:
                    rows.append(Row(f"{name}: {ours}", theirs, ours_s=statistics.median(times[ours]),
                                    reference_s=statistics.median(times[theirs]), target=target,
                                    ours_runs=times[ours], reference_runs=times[theirs], group="grid").finish())
    return rows


ROWS: list[Callable[[BenchConfig], object]] = [
    row_chunked, row_word_lm, rows_small_models, row_stored_bound, row_stored_floor, row_recompute_bound, row_cell_recipe,
    row_keras,
    row_full_bptt, rows_checkpointed, rows_memory, rows_strategy_grid,
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
