"""tbptt: exact truncated backpropagation through time, TBPTT(k1, k2), for any PyTorch recurrent model.

See ``SEMANTICS.md`` for what TBPTT(k1, k2) computes, to the index.
"""

from . import models as models
from .adaptive import AdaptiveTBPTT
from .artbp import ARTBP
from .budget import Budget, BudgetMeter
from .checkpoint import CheckpointError
from .data import (
    TASKS,
    Split,
    Task,
    forecasting_pairs,
    load_task,
    packed_streams,
    padded_batch,
    stateful_streams,
    task_options,
)
from .diagnostics import LagProfile, gradient_vs_lag, recommend_k2
from .distributed import DistributedError, DistributedTrainer, init_from_env
from .engine import STRATEGIES, StreamEngine, UpdateResult
from .gradients import truncated_gradients
from .experiments import Comparison, compare
from .modelcheck import ModelContractError, ModelReport, check_model
from .models import LRU, Mamba, MinGRU, MinLSTM, RecurrentNet
from .memory import GraphMemoryError
from .precision import PRECISIONS, LossScaler
from .records import History, NonFiniteError, UpdateRecord, UpdateStats
from .schedule import TBPTT, Update
from .schedules import Schedule, parse_schedule
from .state import detach, reset_rows
from .trainer import Trainer
from .validate import InvalidArgument

__all__ = [
    "TBPTT",
    "ARTBP",
    "AdaptiveTBPTT",
    "Schedule",
    "parse_schedule",
    "RecurrentNet",
    "check_model",
    "ModelReport",
    "ModelContractError",
    "MinGRU",
    "MinLSTM",
    "LRU",
    "Mamba",
    "Update",
    "Trainer",
    "Budget",
    "BudgetMeter",
    "UpdateRecord",
    "NonFiniteError",
    "History",
    "UpdateStats",
    "GraphMemoryError",
    "CheckpointError",
    "DistributedTrainer",
    "DistributedError",
    "init_from_env",
    "compare",
    "Comparison",
    "gradient_vs_lag",
    "recommend_k2",
    "LagProfile",
    "StreamEngine",
    "UpdateResult",
    "STRATEGIES",
    "PRECISIONS",
    "LossScaler",
    "truncated_gradients",
    "detach",
    "reset_rows",
    "Split",
    "Task",
    "TASKS",
    "load_task",
    "task_options",
    "stateful_streams",
    "padded_batch",
    "packed_streams",
    "forecasting_pairs",
    "InvalidArgument",
]

__version__ = "0.1.0"
