"""Experiments: draw schedules, compare configurations on a task, write reports."""

from .answer import Answer, recommend
from .front import pareto_front
from .plots import plot_history_k2
from .runs import Configuration, RunSpec, run_one
from .summary import summarize
from .sweep import Comparison, compare
from .timeline import plot_schedule, render_timeline, schedule_grid

__all__ = [
    "Answer",
    "recommend",
    "pareto_front",
    "compare",
    "Comparison",
    "Configuration",
    "RunSpec",
    "run_one",
    "summarize",
    "schedule_grid",
    "render_timeline",
    "plot_schedule",
    "plot_history_k2",
]
