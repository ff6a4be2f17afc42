"""Synthetic tasks with a known dependency length, so that a TBPTT window can be set shorter or
longer than what the task needs:

- ``echo``: delayed echo; the target at step t is the input symbol at step t - delay.
- ``adding``: the adding problem (Hochreiter & Schmidhuber, 1997, in the form of Le et al., 2015).
- ``copy``: the copy task (Hochreiter & Schmidhuber, 1997; Arjovsky et al., 2016).
"""

from __future__ import annotations

import torch

from ..validate import positive_ints
from .streams import Split, packed_streams
from .task import (
    Task,
    accuracy,
    cross_entropy,
    mean_squared_error,
    split_generator,
    squared_error,
)


def echo_task(
    *, delay: int = 5, symbols: int = 8, batch_size: int = 16, steps: int = 200, eval_steps: int = 100, seed: int = 0
) -> Task:
    """Delayed echo: uniform random symbols; the target at step t is the input at t - ``delay``.
    Each split is ``batch_size`` independent streams; accuracy counts steps t >= delay only."""
    positive_ints(delay=delay, symbols=symbols, batch_size=batch_size, steps=steps, eval_steps=eval_steps)
    if min(steps, eval_steps) <= delay:
        raise ValueError(f"steps and eval_steps must exceed delay={delay} to leave steps to score; "
                         f"got steps={steps}, eval_steps={eval_steps}")

    def make(index: int, length: int) -> Split:
        x = torch.randint(symbols, (batch_size, length), generator=split_generator(seed, index))
        y = torch.zeros_like(x)
        y[:, delay:] = x[:, :-delay]
        mask = torch.zeros(batch_size, length, dtype=torch.bool)
        mask[:, delay:] = True  # nothing to echo yet before step `delay`
        return Split(x, y, mask)

    splits = [make(0, steps), make(1, eval_steps), make(2, eval_steps)]
    return _classification_task(
        "echo", splits, classes=symbols, vocab=symbols, dependency=delay,
        description=f"delayed echo of {symbols} symbols, delay {delay}: output the input seen {delay} steps ago",
    )


def adding_task(
    *, length: int = 20, batch_size: int = 16, sequences: int = 256, eval_sequences: int = 64, seed: int = 0
) -> Task:
    """The adding problem: channel 0 holds uniform [0, 1) values, channel 1 marks two of them (one
    in each half); the target at a sequence's last step is the sum of the two marked values.
    Sequences of ``length`` steps are streamed back to back through ``batch_size`` rows with resets;
    only last steps are scored (MSE). Baseline: always predict the mean training target."""
    positive_ints(length=length, batch_size=batch_size, sequences=sequences, eval_sequences=eval_sequences)
    if length < 2:
        raise ValueError(f"length must be at least 2 (one marker in each half); got {length}")

    def make(index: int, count: int) -> Split:
        g = split_generator(seed, index)
        values = torch.rand(count, length, generator=g)
        first = torch.randint(0, length // 2, (count,), generator=g)
        second = torch.randint(length // 2, length, (count,), generator=g)
        markers = torch.zeros(count, length)
        rows = torch.arange(count)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        targets = torch.zeros(count, length, 1)
        targets[:, -1, 0] = values[rows, first] + values[rows, second]
        last = torch.zeros(length, dtype=torch.bool)
        last[-1] = True
        inputs = torch.stack([values, markers], dim=-1)
        return packed_streams(list(inputs), list(targets), batch_size, masks=[last] * count)

    train, valid, test = make(0, sequences), make(1, eval_sequences), make(2, eval_sequences)
    mean = float(train.targets[train.mask].mean())
    baseline = {name: mean_squared_error(torch.full_like(s.targets, mean), s.targets, s.mask)
                for name, s in (("valid", valid), ("test", test))}
    return Task(
        "adding", 2, 1, train, valid, test, squared_error, "MSE", False, "predict the mean", baseline,
        dependency=length - 1, vocab=None, metric_fn=mean_squared_error,
        description=f"adding problem, sequences of {length} steps: sum the two marked values",
    )


def copy_task(
    *, length: int = 5, delay: int = 10, symbols: int = 8, batch_size: int = 16, sequences: int = 128,
    eval_sequences: int = 64, seed: int = 0,
) -> Task:
    """The copy task: ``length`` random symbols, then ``delay`` blanks whose last is a "go" marker,
    then ``length`` recall steps on which the symbols must be output in order. Input ids:
    symbols 0..symbols-1, blank ``symbols``, go ``symbols + 1``. Sequences are streamed back to
    back with resets; accuracy on the recall steps only."""
    positive_ints(length=length, delay=delay, symbols=symbols, batch_size=batch_size, sequences=sequences,
                  eval_sequences=eval_sequences)
    blank, go = symbols, symbols + 1
    total = 2 * length + delay
    recall = torch.zeros(total, dtype=torch.bool)
    recall[length + delay:] = True

    def make(index: int, count: int) -> Split:
        memorise = torch.randint(symbols, (count, length), generator=split_generator(seed, index))
        inputs = torch.full((count, total), blank, dtype=torch.int64)
        inputs[:, :length] = memorise
        inputs[:, length + delay - 1] = go
        targets = torch.zeros(count, total, dtype=torch.int64)
        targets[:, length + delay:] = memorise
        return packed_streams(list(inputs), list(targets), batch_size, masks=[recall] * count)

    splits = [make(0, sequences), make(1, eval_sequences), make(2, eval_sequences)]
    return _classification_task(
        "copy", splits, classes=symbols, vocab=symbols + 2, dependency=length + delay,
        description=f"copy task: recall {length} of {symbols} symbols after {delay} steps",
    )


def _classification_task(
    name: str, splits: list[Split], classes: int, vocab: int, dependency: int, description: str
) -> Task:
    """A token task scored by accuracy; its baseline always predicts the most frequent valid
    training target (chance level for uniform symbols)."""
    train, valid, test = splits
    frequent = int(torch.bincount(train.targets[train.mask], minlength=classes).argmax())
    baseline = {}
    for split_name, s in (("valid", valid), ("test", test)):
        constant = torch.zeros(s.targets.shape + (classes,))
        constant[..., frequent] = 1.0
        baseline[split_name] = accuracy(constant, s.targets, s.mask)
    return Task(
        name, vocab, classes, train, valid, test, cross_entropy, "accuracy", True,
        "chance (most frequent training symbol)", baseline, dependency=dependency, vocab=vocab,
        description=description, metric_fn=accuracy,
    )
