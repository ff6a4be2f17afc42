"""Real-data tasks: splits by time, scaling fitted on train only, metrics in original units,
baselines recomputed independently with numpy, and the text task on a file written here."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tbptt.data import StandardScaler, datasets, load_co2, load_sunspots, load_task


def rows_concatenated(values: torch.Tensor, total: int) -> torch.Tensor:
    """The ``total`` steps of a stateful split, row after row (the first ``total % B`` rows hold one
    step more than the others): the series it was cut from."""
    rows = values.shape[0]
    lengths = [total // rows + (row < total % rows) for row in range(rows)]
    return torch.cat([values[row, :length] for row, length in enumerate(lengths)])


def fill_forward(raw: np.ndarray) -> np.ndarray:
    out = raw.copy()
    for t in range(1, len(out)):
        if np.isnan(out[t]):
            out[t] = out[t - 1]
    return out


@pytest.fixture(scope="module")
def co2():
    return load_task("co2", batch_size=3), load_co2()


@pytest.mark.parametrize("difference", [False, True])
@pytest.mark.parametrize("horizon", [1, 2])
def test_co2_splits_by_time_and_scales_with_train_statistics_only(difference, horizon):
    task, raw = load_task("co2", batch_size=3, difference=difference, horizon=horizon), load_co2()
    h, n = horizon, len(raw)
    n_train, n_valid = int(0.7 * n), int(0.15 * n)
    assert np.isnan(raw).sum() > 0  # the real series has unmeasured weeks
    filled = fill_forward(raw)
    # the target of the pair scored at week e: the level there, or its change since week e - h
    level_at = lambda e: raw[e]  # noqa: E731
    change_at = lambda e: raw[e] - filled[e - h]  # noqa: E731
    target_at = change_at if difference else level_at
    # the scaler sees every value of the modelled quantity in the training weeks, nothing later
    train_targets = np.array([target_at(e) for e in range(h if difference else 0, n_train)])
    first = 2 * h if difference else h  # the first week scored: its input needs h (2h) weeks before
    assert task.scaler.mean.item() == pytest.approx(np.nanmean(train_targets), rel=1e-5)
    assert task.scaler.std.item() == pytest.approx(np.nanstd(train_targets), rel=1e-5)
    assert task.train.batch_size == 3 and task.valid.batch_size == task.test.batch_size == 1
    ranges = {"train": (first, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, n)}
    for name, (a, b) in ranges.items():
        s = task.split(name)
        # targets are the split's own weeks, in order; inputs end h weeks earlier, filled causally
        inputs = task.scaler.inverse(rows_concatenated(s.inputs, b - a))[:, 0].numpy()
        targets = task.scaler.inverse(rows_concatenated(s.targets, b - a))[:, 0].numpy()
        weeks = np.arange(a, b)
        known = filled[weeks - h] - filled[weeks - 2 * h] if difference else filled[weeks - h]
        np.testing.assert_allclose(inputs, known, rtol=1e-5, atol=1e-4)
        observed = ~np.isnan(raw[a:b])
        expected = np.array([target_at(e) for e in weeks])
        np.testing.assert_allclose(targets[observed], expected[observed], rtol=1e-5, atol=1e-4)
        # unmeasured weeks are not scored (nor trained on), and neither is the padding
        if observed.all():
            assert s.mask is None or rows_concatenated(s.mask, b - a).all()
        else:
            assert torch.equal(rows_concatenated(s.mask, b - a), torch.from_numpy(observed))
        assert s.valid_steps == observed.sum()


def test_co2_does_not_look_at_later_splits(monkeypatch, co2):
    task, raw = co2
    n_valid_start = int(0.7 * len(raw))
    changed = raw.copy()
    changed[n_valid_start:] *= 100
    monkeypatch.setattr(datasets, "load_co2", lambda: changed)
    other = load_task("co2", batch_size=3)
    assert torch.equal(other.scaler.mean, task.scaler.mean) and torch.equal(other.scaler.std, task.scaler.std)
    assert torch.equal(other.train.inputs, task.train.inputs) and torch.equal(other.train.targets, task.train.targets)
    assert not torch.equal(other.valid.targets, task.valid.targets)


@pytest.mark.parametrize("difference", [False, True])
@pytest.mark.parametrize("horizon", [1, 3])
def test_co2_persistence_baseline_and_metric_in_ppm(horizon, difference):
    task, raw = load_task("co2", horizon=horizon, difference=difference), load_co2()
    n = len(raw)
    a = int(0.7 * n) + int(0.15 * n)  # test targets run from a to n
    previous = fill_forward(raw)[a - horizon : n - horizon]
    errors = raw[a:n] - previous
    expected = math.sqrt(np.nanmean(errors**2))  # unmeasured target weeks are not scored
    assert task.baseline["test"] == pytest.approx(expected, rel=1e-5)
    assert task.metric_name == "RMSE (ppm)" and not task.higher_is_better
    t = task.test
    assert task.score("test", t.targets) == pytest.approx(0.0, abs=1e-4)
    one_ppm_off = t.targets + 1.0 / task.scaler.std
    assert task.score("test", one_ppm_off) == pytest.approx(1.0, rel=1e-4)


def test_sunspots_shapes_scaling_and_persistence():
    task, raw = load_task("sunspots", batch_size=2, eval_batch_size=2), load_sunspots()
    n = len(raw)
    n_train, n_valid = int(0.7 * n), int(0.15 * n)
    assert task.scaler.mean.item() == pytest.approx(raw[:n_train].mean(), rel=1e-6)
    assert task.scaler.std.item() == pytest.approx(raw[:n_train].std(), rel=1e-6)
    assert task.train.valid_steps == n_train - 1 and task.valid.valid_steps == n_valid
    assert task.valid.inputs.shape == (2, math.ceil(n_valid / 2), 1)
    diffs = raw[n_train : n_train + n_valid] - raw[n_train - 1 : n_train + n_valid - 1]
    assert task.baseline["valid"] == pytest.approx(math.sqrt((diffs**2).mean()), rel=1e-5)
    model = task.model(hidden=4)
    outputs, _ = model(task.valid.inputs, None)
    assert outputs.shape == task.valid.targets.shape


def test_series_tasks_reject_too_many_rows():
    with pytest.raises(ValueError, match="sunspots series.*fewer than its 60 rows"):
        load_task("sunspots", eval_batch_size=60)
    with pytest.raises(ValueError, match="difference must be True or False; got 'yes'"):
        load_task("sunspots", difference="yes")


def test_the_series_ship_with_the_package_and_load_without_statsmodels_or_pandas(monkeypatch):
    datasets._series.cache_clear()  # loaded series are cached; read them as a fresh process would
    monkeypatch.setitem(sys.modules, "statsmodels", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    co2, sunspots = load_co2(), load_sunspots()
    # the weekly record from 29 March 1958 to 29 December 2001, 59 weeks without a measurement
    assert co2.shape == (2284,) and int(np.isnan(co2).sum()) == 59
    assert (co2[0], co2[1], co2[-1]) == (316.1, 317.3, 371.5) and np.isnan(co2[6])
    assert sunspots.shape == (309,) and (sunspots[0], sunspots[-1]) == (5.0, 2.9)  # 1700 .. 2008
    text = (Path(datasets.__file__).parent / "series" / "co2_weekly.csv").read_text()
    assert "public domain" in text and "Keeling" in text  # the source is cited where the data are
    load_co2()[0] = -1.0  # callers get copies
    assert load_co2()[0] == 316.1
    assert load_task("co2").train.steps > 0


def test_fill_forward_uses_only_past_values():
    x = torch.tensor([[math.nan], [1.0], [math.nan], [math.nan], [4.0], [math.nan]])
    assert datasets._fill_forward(x)[:, 0].tolist() == [1.0, 1.0, 1.0, 1.0, 4.0, 4.0]


def test_standard_scaler_round_trip_and_constant_feature():
    values = torch.tensor([[1.0, 10.0], [3.0, 30.0], [math.nan, 20.0]])
    scaler = StandardScaler.fit(values)
    assert scaler.mean.tolist() == [2.0, 20.0]
    assert torch.allclose(scaler.std, torch.tensor([1.0, math.sqrt(200 / 3)]))
    x = torch.randn(4, 2)
    assert torch.allclose(scaler.inverse(scaler.transform(x)), x, atol=1e-5)
    with pytest.raises(ValueError, match="constant"):
        StandardScaler.fit(torch.ones(5, 1))


# ---------------------------------------------------------------- text


def test_text_task_on_a_small_file(tmp_path):
    text = "aaab" * 9 + "abca"  # 40 characters: train 36, valid 2, test 2; "c" only in test
    path = tmp_path / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    task = load_task("text", path=str(path), batch_size=5)
    assert task.alphabet == ("a", "b", datasets.UNKNOWN)
    assert (task.vocab, task.n_inputs, task.n_outputs) == (3, 3, 3)
    assert task.metric_name == "bits per character" and not task.higher_is_better
    decode = lambda ids: "".join(task.alphabet[i] for i in ids.tolist())  # noqa: E731
    train = task.train
    assert train.inputs.dtype == torch.int64 and train.inputs.shape == (5, 7)
    assert decode(rows_concatenated(train.inputs, 35)) == text[:35]
    assert decode(rows_concatenated(train.targets, 35)) == text[1:36]
    assert decode(task.valid.targets[0]) == "ab" and decode(task.valid.inputs[0]) == "ba"
    assert decode(task.test.targets[0]) == datasets.UNKNOWN + "a"
    # training counts a=27, b=9, unseen=0, each plus one: 28, 10, 1 out of 39
    bits = lambda count: -math.log2(count / 39)  # noqa: E731
    assert task.baseline["valid"] == pytest.approx((bits(28) + bits(10)) / 2)
    assert task.baseline["test"] == pytest.approx((bits(1) + bits(28)) / 2)
    # the baseline as a model: logits log p everywhere scores the same through the metric
    log_p = torch.log(torch.tensor([28.0, 10.0, 1.0]) / 39)
    assert task.score("test", log_p.expand(1, 2, 3)) == pytest.approx(task.baseline["test"])
    outputs, _ = task.model(hidden=4)(task.valid.inputs, None)
    assert task.loss_fn(outputs, task.valid.targets).shape == (1, 2)


def test_a_long_text_suggests_short_calls_and_few_epochs(tmp_path):
    words = "a recurrent network reads one character at a time ".split()
    text = " ".join(words[i % len(words)] for i in range(200_000))[:1_000_000]
    (tmp_path / "book.txt").write_text(text)
    task = load_task("text", path=tmp_path / "book.txt")
    assert task.train.steps == 56_250 and task.segment_length == 500 and task.epochs == 4  # 1 MB in 16 rows
    assert load_task("co2").segment_length is None and load_task("co2").epochs is None


def test_text_task_errors(tmp_path):
    with pytest.raises(ValueError, match="path="):
        load_task("text")
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij", encoding="utf-8")
    with pytest.raises(ValueError, match="short.txt' has 10 characters; the text task needs at least 20"):
        load_task("text", path=short, batch_size=2)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt' has 0 characters"):
        load_task("text", path=tmp_path / "empty.txt")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    with pytest.raises(ValueError, match=r"latin.txt' is not utf-8 text \(byte 0xe9 at position 3\); give its encoding"):
        load_task("text", path=tmp_path / "latin.txt")
    assert load_task("text", path=tmp_path / "latin.txt", encoding="latin-1").vocab == 6  # c a f é space, unknown
    with pytest.raises(FileNotFoundError):
        load_task("text", path=tmp_path / "missing.txt")
