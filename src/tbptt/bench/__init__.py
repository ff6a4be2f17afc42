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

from .config import PRESETS, BenchConfig, BenchResult, Row, Target, quick_config
from .report import format_markdown
from .rows import ROWS, run_suite

__all__ = ["BenchConfig", "BenchResult", "PRESETS", "ROWS", "Row", "Target", "format_markdown", "quick_config",
           "run_suite"]
