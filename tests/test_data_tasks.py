"""Synthetic tasks (structure against their definitions, baselines by hand), metrics and the registry."""

import math

import pytest
import torch

from tbptt.data import (
    TASKS,
    Split,
    Task,
    accuracy,
    bits_per_symbol,
    cross_entropy,
    load_task,
    mean_squared_error,
    squared_error,
    task_options,
)
from tbptt.models import RecurrentNet


def one_hot_logits(ids: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(ids, classes).float()


def sequences_of(split: Split, row: int) -> list[tuple[int, int]]:
    """(start, stop) of each sequence in a packed row, from its resets; the last ends after the
    row's last scored step (every sequence of these tasks ends on a scored step)."""
    starts = split.resets[row].nonzero().flatten().tolist()
    last_scored = int(split.mask[row].nonzero().max())
    return list(zip(starts, starts[1:] + [last_scored + 1]))


# ---------------------------------------------------------------- metrics and losses


def test_metrics_on_hand_cases():
    targets = torch.tensor([[0, 1, 2, 1]])
    outputs = one_hot_logits(torch.tensor([[0, 1, 0, 0]]), 3)
    assert accuracy(outputs, targets) == 0.5
    assert accuracy(outputs, targets, torch.tensor([[True, True, False, False]])) == 1.0
    assert bits_per_symbol(torch.zeros(1, 4, 8), targets) == pytest.approx(3.0)  # uniform over 8
    y = torch.tensor([[[1.0], [2.0], [3.0]]])
    o = torch.tensor([[[1.0], [4.0], [0.0]]])
    assert mean_squared_error(o, y) == pytest.approx((0 + 4 + 9) / 3)
    assert mean_squared_error(o, y, torch.tensor([[True, True, False]])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no valid step"):
        accuracy(outputs, targets, torch.zeros(1, 4, dtype=torch.bool))


def test_per_step_losses_are_b_by_t():
    o, y = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    assert torch.allclose(squared_error(o, y), ((o - y) ** 2).mean(-1))
    ids = torch.randint(3, (2, 5))
    expected = -torch.log_softmax(o, -1).gather(-1, ids[..., None])[..., 0]
    assert torch.allclose(cross_entropy(o, ids), expected)


# ---------------------------------------------------------------- echo


def test_echo_targets_are_inputs_delayed_and_scored_after_the_delay():
    task = load_task("echo", delay=3, symbols=5, batch_size=4, steps=30, eval_steps=12)
    assert (task.n_inputs, task.n_outputs, task.vocab, task.dependency) == (5, 5, 5, 3)
    assert task.train.inputs.shape == (4, 30) and task.valid.inputs.shape == (4, 12)
    for s in (task.train, task.valid, task.test):
        assert s.inputs.dtype == torch.int64 and s.inputs.max() < 5
        assert torch.equal(s.targets[:, 3:], s.inputs[:, :-3])
        assert not s.mask[:, :3].any() and s.mask[:, 3:].all()
    # a perfect echo scores 1; the baseline is the most frequent training target, counted by hand
    assert task.score("valid", one_hot_logits(task.valid.targets, 5)) == 1.0
    counts = [int((task.train.targets[:, 3:] == k).sum()) for k in range(5)]
    frequent = counts.index(max(counts))
    for name in ("valid", "test"):
        scored = task.split(name).targets[:, 3:]
        assert task.baseline[name] == pytest.approx(float((scored == frequent).float().mean()))


def test_echo_is_seeded_and_splits_differ():
    a, b, c = load_task("echo", seed=1), load_task("echo", seed=1), load_task("echo", seed=2)
    assert torch.equal(a.train.inputs, b.train.inputs)
    assert not torch.equal(a.train.inputs, c.train.inputs)
    assert not torch.equal(a.valid.inputs, a.test.inputs)
    # changing the training size leaves the evaluation data as it was
    assert torch.equal(load_task("echo", seed=1, steps=50).valid.inputs, a.valid.inputs)


# ---------------------------------------------------------------- adding


def test_adding_sequences_have_two_markers_and_their_sum_at_the_end():
    length = 6
    task = load_task("adding", length=length, batch_size=3, sequences=9, eval_sequences=4)
    assert (task.n_inputs, task.n_outputs, task.dependency, task.vocab) == (2, 1, length - 1, None)
    assert task.train.inputs.shape == (3, 3 * length, 2)
    seen = 0
    for s in (task.train, task.valid):
        for row in range(s.batch_size):
            for start, stop in sequences_of(s, row):
                assert stop - start == length
                values, markers = s.inputs[row, start:stop, 0], s.inputs[row, start:stop, 1]
                marked = markers.nonzero().flatten().tolist()
                assert len(marked) == 2 and marked[0] < length // 2 <= marked[1]
                assert s.targets[row, stop - 1, 0] == pytest.approx(float(values[marked].sum()))
                assert s.mask[row, start:stop].tolist() == [False] * (length - 1) + [True]
                seen += 1
    assert seen == 9 + 4
    # eval_sequences=4 over 3 rows leaves two rows one sequence short: padding, never scored
    assert task.valid.mask[1:, length:].sum() == 0 and task.valid.resets[1:, length:].sum() == 0


def test_adding_baseline_predicts_the_training_mean():
    task = load_task("adding", length=8, sequences=64, eval_sequences=32, seed=3)
    train_sums = task.train.targets[task.train.mask][:, 0]
    mean = sum(train_sums.tolist()) / len(train_sums)
    for name in ("valid", "test"):
        s = task.split(name)
        sums = s.targets[s.mask][:, 0].tolist()
        expected = sum((v - mean) ** 2 for v in sums) / len(sums)
        assert task.baseline[name] == pytest.approx(expected, rel=1e-6)
        # the sum of two uniform values has variance 1/6; the mean predictor's MSE is near it
        assert 0.08 < task.baseline[name] < 0.3
    assert abs(mean - 1.0) < 0.15


# ---------------------------------------------------------------- copy


def test_copy_recalls_the_memorised_symbols_after_the_go_marker():
    length, delay, symbols = 3, 4, 6
    task = load_task("copy", length=length, delay=delay, symbols=symbols, batch_size=2, sequences=4)
    assert (task.n_inputs, task.n_outputs, task.vocab, task.dependency) == (8, 6, 8, length + delay)
    blank, go = symbols, symbols + 1
    total = 2 * length + delay
    for row in range(2):
        for start, stop in sequences_of(task.train, row):
            assert stop - start == total
            x, y = task.train.inputs[row, start:stop], task.train.targets[row, start:stop]
            m = task.train.mask[row, start:stop]
            assert x[:length].max() < symbols
            assert x[length:].tolist() == [blank] * (delay - 1) + [go] + [blank] * length
            assert m.tolist() == [False] * (length + delay) + [True] * length
            assert torch.equal(y[length + delay:], x[:length])
    assert task.score("test", one_hot_logits(task.test.targets, symbols)) == 1.0
    counts = torch.bincount(task.train.targets[task.train.mask], minlength=symbols)
    frequent = int(counts.argmax())
    recalled = task.valid.targets[task.valid.mask]
    assert task.baseline["valid"] == pytest.approx(float((recalled == frequent).float().mean()))


# ---------------------------------------------------------------- Task and registry


@pytest.mark.parametrize("name", ["echo", "adding", "copy"])
def test_task_model_fits_the_data_and_the_loss(name):
    task = load_task(name, batch_size=2)
    model = task.model(hidden=8, cell="gru")
    assert isinstance(model, RecurrentNet)
    piece = next(task.train.segments(7))
    outputs, _ = model(piece.inputs, None)
    assert task.loss_fn(outputs, piece.targets).shape == (2, 7)
    with torch.no_grad():
        full, _ = model(task.valid.inputs, None)
    value = task.score("valid", full)
    assert math.isfinite(value)
    with pytest.raises(ValueError, match="do not match targets"):
        task.metric(full[:, :-1], task.valid.targets)


def test_registry_lists_builds_and_rejects_with_clear_errors():
    assert set(TASKS) == {"echo", "adding", "copy", "co2", "sunspots", "text"}
    assert task_options("echo")["delay"] == 5
    assert isinstance(load_task("copy"), Task)
    with pytest.raises(ValueError, match="unknown task 'echos'.*echo, adding"):
        load_task("echos")
    with pytest.raises(ValueError, match="no option dealy.*delay=5"):
        load_task("echo", dealy=3)
    with pytest.raises(ValueError, match="steps and eval_steps must exceed delay=10"):
        load_task("echo", delay=10, eval_steps=10)
    with pytest.raises(ValueError, match="symbols must be a positive int; got 0"):
        load_task("copy", symbols=0)
    with pytest.raises(ValueError, match="seed"):
        load_task("adding", seed=-1)
    with pytest.raises(ValueError, match="split must be one of"):
        load_task("echo").split("validation")
