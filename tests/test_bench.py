"""The benchmark suite on tiny sizes: its rows, finite ratios, and references that do the same training.

No timing is asserted here: speed lives in the suite's own table.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tbptt import TBPTT, bench
from tbptt.bench.config import Row, Target
from tbptt.bench.jobs import (
    Job,
    cell_recipe_job,
    detach_loop_job,
    recompute_loop_job,
    trainer_job,
)
from tbptt.bench.workloads import WordLMWorkload, Workload
from tbptt.cli import main

TINY = bench.quick_config(batch=3, inputs=3, hidden=5, outputs=2, n=40, k=8, k1=4, k2=12, long_n=40,
                          memory_ns=(24, 72), memory_k2s=(8, 16), repeats=2, warmup=0, wordlm_vocab=50,
                          wordlm_updates=2, small_n=20, grid_hidden=(5,), grid_k1=(2,), grid_mult=(2, 4), grid_n=24)


@pytest.fixture(scope="module")
def result() -> bench.BenchResult:
    return bench.run_suite(TINY)


def test_table_has_every_row(result: bench.BenchResult) -> None:
    names = [(r.configuration, r.reference) for r in result.rows]
    refs = [ref for _, ref in names]
    assert "chunked detach() loop" in refs
    assert any(ref.startswith("least work") and "stored" in c for c, ref in names)
    assert any(ref.startswith("least work") and "recompute" in c for c, ref in names)
    assert "hand-written LSTMCell re-run recipe" in refs
    # stored against the kernel calls it must make, and that floor against recompute's least work
    assert any(ref.startswith("floor:") and "stored" in c for c, ref in names)
    grid = [(c.rsplit(": ", 1)[1], ref) for c, ref in names if "hidden" in c and ": " in c]
    assert ("stored", "stored floor") in grid and ("stored floor", "recompute bound") in grid
    assert any("Keras" in ref for ref in refs)
    assert any(c.startswith("TBPTT(n,n) checkpoint") for c, _ in names)
    by_k2 = [r for r in result.rows if r.metric == "memory" and r.reference == f"TBPTT({TINY.k1},{TINY.memory_k2s[0]})"]
    by_n = [r for r in result.rows if r.metric == "memory" and r.reference == f"same, n={TINY.memory_ns[0]}"]
    # per strategy: one row per larger k2, one per longer n
    assert len(by_k2) == 2 * (len(TINY.memory_k2s) - 1)
    assert len(by_n) == 2 * (len(TINY.memory_ns) - 1)


def test_measured_ratios_are_finite_and_positive(result: bench.BenchResult) -> None:
    measured = [r for r in result.rows if r.ours_s is not None and r.reference_s is not None]
    assert len(measured) >= 6
    for row in measured:
        assert row.ratio is not None and math.isfinite(row.ratio) and row.ratio > 0, row
        assert row.ours_s > 0 and row.reference_s > 0
        assert row.met in (True, False) if row.target is not None else row.met is None
    for row in result.rows:
        if row.ratio is None:  # a row that could not run says why
            assert row.note


def test_memory_rows_measure_bytes(result: bench.BenchResult) -> None:
    for row in result.rows:
        if row.metric == "memory" or row.reference == "chunked detach() loop":
            assert row.ours_bytes and row.ours_bytes > 0 and row.reference_bytes and row.reference_bytes > 0
            assert math.isfinite(row.ratio) and row.ratio > 0
    # activations held grow with the window: a longer k2 holds more than the shortest
    grow = [r for r in result.rows if r.reference == f"TBPTT({TINY.k1},{TINY.memory_k2s[0]})"]
    assert grow and all(r.ratio > 1 for r in grow)


def test_markdown_and_json(result: bench.BenchResult) -> None:
    text = bench.format_markdown(result)
    grid = [r for r in result.rows if r.group == "grid"]
    # header and one line per row; the grid: its header and one line per configuration (a row per comparison)
    pairs = len(bench.config.GRID_PAIRS)
    assert text.count("\n| ") == len(result.rows) - len(grid) + 1 + 1 + len(grid) // pairs
    assert "torch" in text and "B=3" in text
    back = json.loads(json.dumps(result.as_dict()))
    assert len(back["rows"]) == len(result.rows) and back["config"]["hidden"] == 5


def _trained(job: Job) -> list[torch.Tensor]:
    run, params = job()
    run()
    return [p.detach().clone() for p in params]


def test_detach_loop_trains_like_the_trainer() -> None:
    # the comparison is fair only if both sides do the same training
    work = Workload(3, 3, 5, 2, n=37, lr=0.1)
    ours = _trained(trainer_job(work, TBPTT(8, 8)))
    theirs = _trained(detach_loop_job(work, 8))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k1,k2", [(4, 12), (3, 8), (5, 6)])
def test_cell_recipe_trains_like_recompute(k1: int, k2: int) -> None:
    work = Workload(3, 3, 5, 2, n=29, lr=0.1)
    ours = _trained(trainer_job(work, TBPTT(k1, k2), "recompute"))
    theirs = _trained(cell_recipe_job(work, k1, k2))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", [TBPTT(1, 5), TBPTT(3, 7), TBPTT(1, None), TBPTT(2, 4)])
def test_hand_written_recompute_loop_trains_like_recompute(schedule: TBPTT) -> None:
    work = Workload(3, 3, 5, 2, n=23, lr=0.1)
    ours = _trained(trainer_job(work, schedule, "recompute"))
    theirs = _trained(recompute_loop_job(work, schedule))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_word_lm_loop_trains_like_the_trainer() -> None:
    # dropout draws the same masks on both sides: one model call per chunk, in the same order
    work = WordLMWorkload(batch=3, vocab=40, embedding=6, hidden=5, n=70)
    torch.manual_seed(1)
    ours = _trained(trainer_job(work, TBPTT(35, 35)))
    torch.manual_seed(1)
    theirs = _trained(detach_loop_job(work, 35))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_row_whose_spread_straddles_its_target_is_noisy_not_a_miss() -> None:
    target = Target("<=", 1.05, "<= 1.05")
    noisy = Row("a", "b", ours_s=1.1, reference_s=1.0, ours_runs=[1.0, 1.1, 1.3], reference_runs=[1.0, 1.0, 1.0],
                target=target).finish()
    missed = Row("a", "b", ours_s=1.2, reference_s=1.0, ours_runs=[1.1, 1.2, 1.3], reference_runs=[1.0, 1.0, 1.0],
                 target=target).finish()
    met = Row("a", "b", ours_s=1.0, reference_s=1.0, ours_runs=[1.0], reference_runs=[1.0], target=target).finish()
    assert (noisy.verdict, missed.verdict, met.verdict) == ("noisy", "no", "yes")
    assert noisy.spread == (1.0, 1.3)


def test_bad_configurations_are_rejected() -> None:
    with pytest.raises(ValueError, match="k1 < k2"):
        bench.quick_config(k1=8, k2=8)
    with pytest.raises(ValueError, match="hidden"):
        bench.quick_config(hidden=0)
    with pytest.raises(ValueError, match="device"):
        bench.quick_config(device="tpu")


def test_cli_rejects_a_bad_output_name(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--quick", "--out", "table.txt"]) == 2
    assert ".json or .md" in capsys.readouterr().err


def test_cli_writes_json_and_markdown(result, tmp_path, monkeypatch, capsys) -> None:
    seen = {}

    def fake_suite(config, progress=None):
        seen["config"] = config
        return result

    monkeypatch.setattr(bench, "run_suite", fake_suite)
    json_out, md_out = tmp_path / "r" / "table.json", tmp_path / "table.md"
    assert main(["bench", "--full", "--repeats", "2", "--memory-n", "100,1000",
                 "--out", str(json_out), "--out", str(md_out)]) == 0
    assert seen["config"].hidden == bench.PRESETS["full"].hidden and seen["config"].repeats == 2
    assert seen["config"].memory_ns == (100, 1000)
    assert json.loads(json_out.read_text())["rows"][0]["configuration"] == result.rows[0].configuration
    assert md_out.read_text() == capsys.readouterr().out == bench.format_markdown(result)


def test_cli_rejects_bad_memory_lengths(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--memory-n", "1000,lots"]) == 2
    assert "--memory-n" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="cuda"):
        bench.run_suite(bench.quick_config(device="cuda"))
