"""Data for training with TBPTT: streams arranged from series, sequences and documents, and tasks
(synthetic ones with a known dependency length, real ones loaded offline) with their baselines."""

from .datasets import (
    StandardScaler,
    co2_task,
    load_co2,
    load_sunspots,
    rmse_in_units,
    sunspots_task,
    text_task,
)
from .streams import (
    Split,
    as_split,
    forecasting_pairs,
    packed_streams,
    padded_batch,
    stateful_streams,
)
from .synthetic import adding_task, copy_task, echo_task
from .task import (
    Task,
    accuracy,
    bits_per_symbol,
    cross_entropy,
    mean_squared_error,
    squared_error,
)
from .tasks import TASKS, load_task, task_options

__all__ = [
    "Split",
    "as_split",
    "stateful_streams",
    "padded_batch",
    "packed_streams",
    "forecasting_pairs",
    "Task",
    "TASKS",
    "load_task",
    "task_options",
    "echo_task",
    "adding_task",
    "copy_task",
    "co2_task",
    "sunspots_task",
    "text_task",
    "load_co2",
    "load_sunspots",
    "StandardScaler",
    "squared_error",
    "cross_entropy",
    "accuracy",
    "mean_squared_error",
    "bits_per_symbol",
    "rmse_in_units",
]
