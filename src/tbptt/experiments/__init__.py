"""Experiments: draw schedules, compare configurations on a task, write reports."""

from .timeline import plot_schedule, render_timeline, schedule_grid

__all__ = ["schedule_grid", "render_timeline", "plot_schedule"]
