"""Drawing a TBPTT(k1, k2) schedule: which steps each update advances, backpropagates and injects.

Every picture here is read off ``schedule.updates(n)`` (for ARTBP, one draw of them, ``seed``
choosing which) as one grid, ``schedule_grid(schedule, n)``:
one row per update, one column per stream step (long streams: the rows shown only, a column per
bin of steps, showing the strongest kind in it), each cell one of

- ``OUTSIDE``: the update does not touch the step;
- ``ADVANCE``: a step of the update's block before its window (k1 > k2): run forward only;
- ``WINDOW``: backpropagated through, but its error is not injected by this update;
- ``ERROR``: its error is injected by this update (and it is backpropagated through).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ..adaptive import AdaptiveTBPTT
from ..artbp import ARTBP
from ..compensation import uniforms
from ..files import atomic_write_figure
from ..schedule import Update, updates_cost
from ..schedules import Schedule, check_schedule
from ..validate import non_negative_int, positive_int

OUTSIDE, ADVANCE, WINDOW, ERROR = 0, 1, 2, 3
KIND_NAMES = {OUTSIDE: "outside", ADVANCE: "forward only", WINDOW: "window", ERROR: "errors injected"}
_GLYPHS = {OUTSIDE: ("·", "dim"), ADVANCE: ("─", "yellow"), WINDOW: ("░", "blue"), ERROR: ("█", "red")}
_COLOURS = ["#f4f4f4", "#f2c14e", "#8fb8de", "#d1495b"]


def drawn_updates(schedule: Schedule, n: int, seed: int = 0) -> list[Update]:
    """The updates of ``schedule`` on ``n`` steps; for ARTBP, one draw (from a generator seeded with
    ``seed``). AdaptiveTBPTT's windows depend on the gradients a model has in training: refused."""
    check_schedule(schedule)
    if isinstance(schedule, AdaptiveTBPTT):
        raise ValueError(
            f"{schedule} chooses k2 from the gradients measured in training, so its windows cannot be drawn "
            f"without a model; draw TBPTT({schedule.k1}, K2) for a K2 in [{schedule.lowest}, {schedule.max_k2}]"
        )
    if isinstance(schedule, ARTBP):
        non_negative_int(seed, "seed")
        return schedule.updates(n, uniforms(torch.Generator().manual_seed(seed)))
    return schedule.updates(n)


def _name(schedule: Schedule, seed: int) -> str:
    return f"{schedule} (one draw, seed {seed})" if isinstance(schedule, ARTBP) else str(schedule)


def schedule_grid(schedule: Schedule, n: int, seed: int = 0) -> np.ndarray:
    """The ``[updates, n]`` grid of cell kinds (``OUTSIDE``/``ADVANCE``/``WINDOW``/``ERROR``)."""
    updates = drawn_updates(schedule, n, seed)
    return _rows(updates, range(len(updates)), n, 1)


def _rows(updates: list, rows, n: int, steps_per_column: int) -> np.ndarray:
    """The grid's ``rows`` only, each column covering ``steps_per_column`` steps and showing the
    strongest kind among them: what a long stream's drawing needs, without the whole grid."""
    columns = math.ceil(n / steps_per_column)
    grid = np.full((len(rows), columns), OUTSIDE, dtype=np.int8)
    for line, row in zip(grid, rows):
        u = updates[row]
        previous = updates[row - 1].stop if row > 0 else 0
        for kind, a, b in ((ADVANCE, previous, u.start), (WINDOW, u.start, u.loss_start), (ERROR, u.loss_start, u.stop)):
            if b > a:
                cells = line[a // steps_per_column : (b - 1) // steps_per_column + 1]
                np.maximum(cells, kind, out=cells)
    return grid


def _bins(n: int, width: int) -> int:
    """Steps per terminal column so that ``n`` steps fit in ``width`` columns."""
    return max(1, math.ceil(n / max(1, width)))


def binned_grid(grid: np.ndarray, steps_per_column: int) -> np.ndarray:
    """The grid with each column covering ``steps_per_column`` steps, showing the strongest kind."""
    rows, n = grid.shape
    columns = math.ceil(n / steps_per_column) if n else 0
    padded = np.full((rows, columns * steps_per_column), OUTSIDE, dtype=grid.dtype)
    padded[:, :n] = grid
    return padded.reshape(rows, columns, steps_per_column).max(axis=2) if columns else padded


def _shown_rows(count: int, max_rows: int) -> list[Optional[int]]:
    """Row indices to print, with None where a run of rows is elided."""
    if count <= max_rows:
        return list(range(count))
    head = max_rows - max_rows // 3
    tail = max_rows - head - 1
    return list(range(head)) + [None] + list(range(count - tail, count))


def render_timeline(schedule: Schedule, n: int, width: int = 100, max_rows: int = 30, seed: int = 0) -> Any:
    """A terminal timeline: one line per update, one character per step (or per bin of steps).
    Only the lines shown are built, so a long stream costs ``max_rows`` lines of ``width`` cells."""
    from rich.console import Group
    from rich.text import Text

    positive_int(width, "width", "columns")
    updates = drawn_updates(schedule, n, seed)
    per = _bins(n, width)
    shown = _shown_rows(len(updates), max_rows)
    grid = _rows(updates, [r for r in shown if r is not None], n, per)
    present = set(np.unique(grid).tolist())  # the legend names only what is drawn
    cells = iter(grid)
    columns = math.ceil(n / per)
    label_width = len(f"T={n}") + 1
    lines: list[Text] = []
    scale = f"1 column = {per} steps" if per > 1 else "1 column = 1 step"
    lines.append(Text(f"{_name(schedule, seed)} on n={n} steps ({scale})", style="bold"))
    ruler = "".join("|" if (c * per) % (10 * per) == 0 else " " for c in range(columns))
    lines.append(Text(" " * label_width + ruler, style="dim"))
    for row in _shown_rows(len(updates), max_rows):
        if row is None:
            skipped = len(updates) - max_rows + 1
            lines.append(Text(f"{'':{label_width}}... {skipped} more updates ...", style="dim"))
            continue
        line = Text(f"{'T=' + str(updates[row].stop):<{label_width}}")
        for kind in next(cells):
            glyph, style = _GLYPHS[int(kind)]
            line.append(glyph, style=style)
        lines.append(line)
    legend = Text()
    for kind in [k for k in (ERROR, WINDOW, ADVANCE, OUTSIDE) if k in present]:
        glyph, style = _GLYPHS[kind]
        legend.append(glyph, style=style)
        legend.append(f" {KIND_NAMES[kind]}   ")
    lines.append(legend)
    return Group(*lines)


def cost_table(schedule: Schedule, n: int, seed: int = 0) -> Any:
    """What the schedule costs on a stream of ``n`` steps (for ARTBP, the draw shown), from its updates."""
    from rich.table import Table

    cost = updates_cost(drawn_updates(schedule, n, seed), n)
    table = Table(title=f"cost of {_name(schedule, seed)} on n={n}", show_header=True)
    table.add_column("quantity")
    table.add_column("steps", justify="right")
    table.add_column("meaning")
    table.add_row("updates", str(cost["updates"]), "optimizer steps")
    if isinstance(schedule, ARTBP):
        table.add_row("forward (stored)", "-", "ARTBP runs with recompute only")
    else:
        table.add_row("forward (stored)", str(cost["forward_stored"]), "each step run once")
    table.add_row("forward (recompute)", str(cost["forward_recompute"]), "each window run at current weights")
    table.add_row("backward", str(cost["backward"]), "steps backpropagated, all updates")
    table.add_row("memory", str(cost["max_window"]), "activations held at once (longest window)")
    return table


def plot_schedule(schedule: Schedule, n: int, path: Optional[Union[str, Path]] = None, max_rows: int = 60,
                  seed: int = 0):
    """A matplotlib figure of the grid (updates down, steps across); saved as PNG when ``path`` is given.

    Schedules with more than ``max_rows`` updates show their first ``max_rows``.
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    all_updates = drawn_updates(schedule, n, seed)
    shown = _rows(all_updates, range(min(max_rows, len(all_updates))), n, 1)
    rows = max(1, shown.shape[0])
    fig = Figure(figsize=(min(12.0, 6.0 + 0.08 * n), min(8.0, 2.0 + 0.25 * rows)), dpi=100)
    ax = fig.add_subplot()
    cmap = ListedColormap(_COLOURS)
    norm = BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5], cmap.N)
    ax.imshow(shown if shown.size else np.zeros((1, max(n, 1)), dtype=np.int8), cmap=cmap, norm=norm,
              aspect="auto", interpolation="nearest", extent=(0, max(n, 1), rows, 0))
    updates = all_updates[:max_rows]
    ax.set_yticks([r + 0.5 for r in range(len(updates))])
    ax.set_yticklabels([f"T={u.stop}" for u in updates], fontsize=7)
    ax.set_xlabel("stream step")
    more = f" (first {max_rows} of {len(all_updates)} updates)" if len(all_updates) > max_rows else ""
    cost = updates_cost(all_updates, n)
    ax.set_title(
        f"{_name(schedule, seed)}, n={n}{more}\nforward {cost['forward_stored']} (stored) / "
        f"{cost['forward_recompute']} (recompute), backward {cost['backward']}, memory {cost['max_window']}",
        fontsize=9,
    )
    present = set(np.unique(shown).tolist())  # the legend names only what is drawn
    handles = [Patch(color=_COLOURS[k], label=KIND_NAMES[k]) for k in (ERROR, WINDOW, ADVANCE) if k in present]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    if path is not None:
        atomic_write_figure(path, fig)
    return fig
