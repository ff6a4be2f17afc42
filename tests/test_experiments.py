"""Experiments: the schedule drawing agrees with updates(n); sweep summaries and reports."""

from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from _models import oracle_updates
from hypothesis import given, settings
from hypothesis import strategies as hs

from tbptt import TBPTT
from tbptt.diagnostics import grad_norm_summary, roughness
from tbptt.experiments import page as html_page
from tbptt.experiments import plots, report, summary, sweep, timeline
from tbptt.experiments import runs as runs_module
from tbptt.experiments.answer import recommend

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


# ---------------------------------------------------------------------------------------------
# sweep summaries and reports, on runs written by hand


def fake_run(config, seed, finals, status="ok", norms=(1.0, 2.0, 3.0), wall=2.0):
    """A run whose validation metric per epoch is ``finals``, an epoch per CPU second."""
    epochs = [{"epoch": i + 1, "valid_metric": m, "cpu_elapsed": float(i + 1), "train_cpu": 0.9 * (i + 1),
               "backward_steps": 10 * (i + 1)} for i, m in enumerate(finals)]
    finite = [m for m in finals if math.isfinite(m)]
    return {
        "config": config, "strategy": "recompute", "seed": seed, "index": seed, "status": status,
        "epochs": epochs, "final_metric": finals[-1], "best_metric": max(finite) if finite else math.nan,
        "grad_norms": list(norms), "update_index": list(range(1, len(norms) + 1)),
        **grad_norm_summary(norms),
        "roughness": 0.1, "wall_time": wall, "cpu_time": wall, "train_cpu": 0.9 * wall, "steps_per_s": 100.0,
        "updates": len(norms), "k1": None, "k2": None,
        "forward_steps": 10, "backward_steps": 20, "peak_graph_mb": 0.5,
    }


RUNS = [
    fake_run("TBPTT(5,5)", 0, [0.2, 0.3]),
    fake_run("TBPTT(5,5)", 1, [0.2, 0.5]),
    fake_run("TBPTT(2,8)", 0, [0.6, 0.9], norms=(1.0, 1.0, 50.0)),
    fake_run("TBPTT(2,8)", 1, [0.1, float("nan")], status="diverged"),
    {"config": "TBPTT(2,8)", "strategy": "recompute", "seed": 2, "index": 4, "status": "failed", "error": "boom"},
]


def test_summary_rows_by_hand():
    rows, target = summary.summarize(RUNS, baseline=0.1, higher_is_better=True)
    assert target == pytest.approx(0.1 + 0.9 * (0.9 - 0.1))  # 90% of the way to the best run's best
    five, two = rows
    assert (five["runs"], five["failed"], five["diverged"]) == (2, 0, 0)
    assert five["final_metric"] == pytest.approx(0.4)
    assert five["final_metric_std"] == pytest.approx(math.sqrt(0.02))  # sample sd of 0.3 and 0.5
    assert five["best_metric"] == pytest.approx(0.4)
    assert five["beats_baseline"] == 2 and five["reached_target"] == 0
    assert (two["runs"], two["failed"], two["diverged"]) == (3, 1, 1)
    assert two["final_metric"] == pytest.approx(0.9)  # the diverged run's NaN is left out
    assert two["grad_norm_max"] == 50.0 and two["grad_spikes"] == pytest.approx(0.5)
    assert two["time_to_target"] == pytest.approx(2.0) and two["reached_target"] == 1
    lower, _ = summary.summarize(RUNS[:2], baseline=0.1, higher_is_better=False, target=0.25)
    assert lower[0]["time_to_target"] == pytest.approx(1.0)  # lower is better: 0.2 <= 0.25 at epoch 1


def test_report_files_exist_and_parse(tmp_path):
    meta = {"task": "echo", "metric_name": "accuracy", "higher_is_better": True, "baseline": 0.1,
            "baseline_name": "chance", "settings": {"epochs": 2}}
    rows, target = summary.summarize(RUNS, 0.1, True)
    meta["target"] = target
    report.write_results(tmp_path, meta, rows, RUNS)
    images = plots.write_plots(tmp_path, RUNS, rows, meta)
    answer = recommend(rows, RUNS, meta)
    page = html_page.write_html(tmp_path, meta, rows, images, answer)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["config"] for r in data["summary"]] == ["TBPTT(5,5)", "TBPTT(2,8)"]
    assert len(data["runs"]) == 5 and data["meta"]["target"] == pytest.approx(target)
    assert data["runs"][3]["final_metric"] is None  # NaN is written as null, valid JSON
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["config"] for r in table] == ["TBPTT(5,5)", "TBPTT(2,8)"] and table[1]["diverged"] == "1"
    with open(tmp_path / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    for _, path in images:
        assert path.read_bytes()[:4] == b"\x89PNG"
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 4 and "TBPTT(2,8)" in text and "1/2" in text
    # the answer first: TBPTT(2,8) scored higher but diverged in one run, so the stable one is chosen
    assert text.index("Use <b>TBPTT(5,5)</b>") < text.index("Pareto front") < text.index("<h3>skill</h3>")
    for caption in plots.FIGURES.values():  # every figure with what its lines and bands are
        assert html.escape(caption) in text


def test_configuration_strings():
    c = runs_module.Configuration.parse("20,20@lr=1e3,strategy=stored")
    assert (c.schedule.k1, c.schedule.k2, c.lr, c.strategy) == (20, 20, 1000.0, "stored")
    assert str(c) == "TBPTT(20,20) lr=1000 strategy=stored"
    assert str(runs_module.Configuration.parse("n,n")) == "TBPTT(n,n)"
    with pytest.raises(ValueError, match="momentum"):
        runs_module.Configuration.parse("5,5@momentum=0.9")
    with pytest.raises(ValueError, match="lr"):
        runs_module.Configuration.parse("5,5@lr=-1")


def test_graph_memory_counts_each_saved_storage_once_until_freed():
    meter = runs_module.GraphMemory()
    a = torch.randn(1000, requires_grad=True)
    with meter.hooks():
        b = a.exp()  # saves its output b: 4000 bytes
        c = (b * b).sum()  # saves b twice: the same storage, counted once
    assert meter.peak == 4000 and meter.current == 4000
    c.backward()  # frees the graph
    del b, c
    assert meter.current == 0 and meter.peak == 4000


def test_a_long_stream_draws_only_the_rows_shown(tmp_path):
    import tracemalloc

    n = 20_000  # TBPTT(1,1) has n updates: the whole grid would be n * n = 400 MB
    tracemalloc.start()
    try:
        lines = [t.plain for t in timeline.render_timeline(TBPTT(1, 1), n, width=50, max_rows=10).renderables]
        timeline.plot_schedule(TBPTT(1, 1), n, path=tmp_path / "long.png", max_rows=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 30 * 2**20
    rows = [line.split(maxsplit=1)[1] for line in lines if line.startswith("T=")]
    # 400 steps per column: update T = t injects step t - 1, in column (t - 1) // 400
    assert rows[0] == "█" + "·" * 49 and rows[-1] == "·" * 49 + "█"
    assert any(f"{n - 9} more updates" in line for line in lines)
    with pytest.raises(ValueError, match="width"):
        timeline.render_timeline(TBPTT(2, 5), 10, width=0)


@pytest.mark.parametrize("field,value,message", [
    ("clip", -1.0, "clip must be a positive number or None"),
    ("clip", 0.0, "clip must be a positive number or None"),
    ("hidden", 0, "hidden must be a positive int"),
    ("model", "transformer", "model must be one of .*path/to/file.py:factory"),
    ("segment_length", 0, "segment_length must be a positive int"),
    ("max_seconds", -1.0, "max_seconds must be a positive number"),
    ("max_seconds", float("nan"), "max_seconds must be a positive number"),
    ("budget", "cpu", "budget must be KIND:AMOUNT"),
    ("epochs", None, "epochs must be a positive int when there is no budget"),
    ("probe_lags", 0, "probe_lags must be a positive int"),
    ("lr", float("inf"), "lr must be a positive number"),
    ("threads", 0, "threads must be a positive int"),
])
def test_run_spec_rejects_bad_settings_before_any_run(field, value, message):
    with pytest.raises(ValueError, match=message):
        runs_module.RunSpec(task="echo", config="5,5", **{field: value})


def test_grad_norms_of_seeds_that_stopped_at_different_updates_share_the_fraction_axis(tmp_path):
    long = fake_run("TBPTT(5,5)", 0, [0.2, 0.3], norms=(1.0, 2.0, 4.0, 8.0, 16.0))
    short = fake_run("TBPTT(5,5)", 1, [0.2], norms=(3.0, float("nan")), status="diverged")
    thinned = {**fake_run("TBPTT(5,5)", 2, [0.2, 0.3], norms=(2.0, 32.0)), "update_index": [1, 5]}
    grid = np.array([0.2, 0.4, 0.6, 1.0])
    norms = plots.norms_by_fraction([long, short, thinned], grid)
    assert norms[0] == pytest.approx([1, 2, 4, 16])  # 5 updates: fraction 0.2 is update 1, 1.0 is update 5
    assert np.isnan(norms[1]).all()  # its one finite norm is at 0.5, then it diverged: nothing on this grid
    # between its recorded updates 1 and 5, interpolated on a log scale
    assert norms[2] == pytest.approx([2, 4, 8, 32])
    path = plots.plot_grad_norms([long, short, thinned], {"task": "t", "settings": {"clip": 1.0}}, tmp_path / "g.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_a_figure_that_fails_leaves_the_others_and_the_report(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no ink")

    monkeypatch.setattr(plots, "plot_front", broken)
    meta = {"task": "echo", "metric_name": "accuracy", "higher_is_better": True, "baseline": 0.1, "target": 0.5}
    rows, _ = summary.summarize(RUNS, 0.1, True)
    images = plots.write_plots(tmp_path, RUNS, rows, meta)
    assert [p is None for _, p in images] == [True, False, False, False]
    assert "no ink" in images[0][0]
    page = html_page.write_html(tmp_path, meta, rows, images).read_text()
    assert page.count("data:image/png;base64,") == 3 and "Figure missing" in page and "no ink" in page


def test_headline_ranks_by_cpu_seconds_to_the_target_not_by_run_length():
    runs = [
        fake_run("TBPTT(1,n)", 0, [0.1, 0.6], wall=2.0),  # shortest run, reaches the target at 2 s
        fake_run("TBPTT(5,5)", 1, [0.6] * 5, wall=5.0),  # longer run, there at 1 s
        fake_run("TBPTT(n,n)", 2, [0.1, 0.1, 0.99], wall=3.0),  # best final, there at 3 s
    ]
    meta = {"metric_name": "accuracy", "higher_is_better": True, "baseline": 0.1}
    rows, target = summary.summarize(runs, 0.1, True, target=0.5)
    assert [r["time_to_target"] for r in rows] == [2.0, 1.0, 3.0]
    line = sweep.summary_line(sweep.Comparison(meta, runs, rows, target))
    assert "best final validation accuracy: TBPTT(n,n)" in line
    assert "in every run: TBPTT(5,5) (1.0 CPU s to target)" in line
    fastest_is_best = sweep.summary_line(sweep.Comparison(meta, runs, rows[1:2], target))
    assert "TBPTT(5,5) (0.6" in fastest_is_best and "it was also the soonest to reach accuracy 0.5 in every run (1.0" in fastest_is_best
    captions = [t.caption for t in report.terminal_tables(rows, {**meta, "target": target})]
    assert "max over seeds" in captions[1] and "means over seeds" in captions[1] and "validation" in captions[1]
    assert "stream steps" in captions[2]


TINY_ECHO = runs_module.RunSpec(task="echo", config="5,5", epochs=3, hidden=8,
                                task_options=(("batch_size", 4), ("eval_steps", 20), ("steps", 30)))


def test_a_run_measures_roughness_on_validation_and_time_to_target_in_cpu_seconds():
    run = runs_module.run_one(TINY_ECHO)
    assert run["status"] == "ok" and run["steps"] == 3 * 30
    assert run["roughness"] == roughness([e["valid_loss"] for e in run["epochs"]])
    clock = [e["cpu_elapsed"] for e in run["epochs"]]
    assert clock == sorted(clock) and 0 < clock[-1] <= run["cpu_time"]


def test_a_run_stopped_by_its_budget_counts_the_steps_it_trained():
    run = runs_module.run_one(replace(TINY_ECHO, epochs=None, budget="backward:40"))
    assert run["stopped_by"] == "backward:40" and run["budget"] == "backward:40" and run["epochs"][-1]["partial"]
    # TBPTT(5,5) on 30-step streams: one whole epoch (6 updates), then 2 updates of the next one
    assert run["backward_steps"] == 40 and run["updates"] == 8 and run["steps"] == 40
    assert run["steps_per_s"] == pytest.approx(40 / run["train_time"])
    assert 0 < run["train_cpu"] <= run["cpu_time"]
    nothing = runs_module.run_one(replace(TINY_ECHO, max_seconds=1e-9))
    assert nothing["stopped_by"] == "max_seconds" and nothing["status"] == "ok" and nothing["updates"] == 0


def test_default_workers_are_shared_among_a_machines_ranks(monkeypatch):
    monkeypatch.setattr(sweep.mp, "cpu_count", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert sweep.default_jobs(distributed=True) == 4
    assert sweep.default_jobs(distributed=False) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert sweep.default_jobs(distributed=True) == 1
    # runs of several threads each: fewer of them, so that together they keep to the CPUs
    assert sweep.default_jobs(distributed=False, threads=2) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert sweep.default_jobs(distributed=True, threads=2) == 2


def test_a_label_names_the_strategy_once():
    assert summary.label({"config": "TBPTT(1,50) strategy=stored", "strategy": "stored"}, 2) == "TBPTT(1,50) strategy=stored"
    assert summary.label({"config": "TBPTT(1,50)", "strategy": "stored"}, 2) == "TBPTT(1,50) stored"
    assert summary.label({"config": "TBPTT(1,50)", "strategy": "stored"}, 1) == "TBPTT(1,50)"
