"""Experiments: the schedule drawing agrees with updates(n); sweep summaries and reports."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as hs

from tbptt import TBPTT
from tbptt.experiments import timeline
from _models import oracle_updates

GLYPH_KIND = {"·": timeline.OUTSIDE, "─": timeline.ADVANCE, "░": timeline.WINDOW, "█": timeline.ERROR}


def rendered_rows(schedule: TBPTT, n: int, width: int = 200, max_rows: int = 1000) -> list[str]:
    """The step cells of each update line of the terminal timeline, as plain text."""
    lines = [t.plain for t in timeline.render_timeline(schedule, n, width, max_rows).renderables]
    return [line.split(maxsplit=1)[1] for line in lines if line.startswith("T=")]


def test_timeline_matches_the_semantics_examples():
    # SEMANTICS.md, n = 10: TBPTT(2, 5) -> (0,0,2) (0,2,4) (1,4,6) (3,6,8) (5,8,10)
    assert rendered_rows(TBPTT(2, 5), 10) == [
        "██········",
        "░░██······",
        "·░░░██····",
        "···░░░██··",
        "·····░░░██",
    ]
    # TBPTT(5, 2) -> (3,3,5) (8,8,10): the first k1 - k2 steps of each block only advance the state
    assert rendered_rows(TBPTT(5, 2), 10) == ["───██·····", "·····───██"]
    assert rendered_rows(TBPTT(3, 7), 10) == ["███·······", "░░░███····", "··░░░░███·", "·····░░░░█"]


ks = hs.one_of(hs.none(), hs.integers(1, 9))


@settings(max_examples=40, deadline=None)
@given(k1=ks, k2=ks, n=hs.integers(1, 40), errors=hs.sampled_from(["new", "window"]))
def test_grid_text_and_image_agree_with_updates(k1, k2, n, errors):
    schedule = TBPTT(k1, k2, errors)
    expected = oracle_updates(n, k1, k2, errors)
    grid = timeline.schedule_grid(schedule, n)
    assert grid.shape == (len(expected), n)
    previous = 0
    for row, (start, loss_start, stop) in zip(grid, expected):
        # each row, read back, gives the update's window, errors and the block's forward-only steps
        errors_at = np.flatnonzero(row == timeline.ERROR)
        window_at = np.flatnonzero((row == timeline.WINDOW) | (row == timeline.ERROR))
        advance_at = np.flatnonzero(row == timeline.ADVANCE)
        assert errors_at.tolist() == list(range(loss_start, stop))
        assert window_at.tolist() == list(range(start, stop))
        assert advance_at.tolist() == list(range(previous, start))
        previous = stop
    text = rendered_rows(schedule, n)
    assert [[GLYPH_KIND[c] for c in line] for line in text] == grid.tolist()
    fig = timeline.plot_schedule(schedule, n, max_rows=1000)
    if len(expected):
        assert np.array_equal(np.asarray(fig.axes[0].images[0].get_array()), grid)


def test_binned_timeline_shows_the_strongest_kind_per_column():
    grid = timeline.schedule_grid(TBPTT(4, 6), 50)
    binned = timeline.binned_grid(grid, 3)
    assert binned.shape == (grid.shape[0], 17)
    for c in range(17):
        assert np.array_equal(binned[:, c], grid[:, 3 * c : 3 * c + 3].max(axis=1))
    rows = rendered_rows(TBPTT(4, 6), 50, width=17)
    assert [[GLYPH_KIND[ch] for ch in line] for line in rows] == binned.tolist()


def test_long_schedules_elide_rows_and_png_is_written(tmp_path):
    lines = [t.plain for t in timeline.render_timeline(TBPTT(1, 3), 100, max_rows=10).renderables]
    assert sum(line.startswith("T=") for line in lines) == 9
    assert any("91 more updates" in line for line in lines)
    path = tmp_path / "s.png"
    timeline.plot_schedule(TBPTT(2, 5), 10, path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
