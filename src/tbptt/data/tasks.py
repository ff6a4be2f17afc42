"""Tasks: data split three ways, a loss, a skill metric and the trivial baseline to beat.

``load_task(name, **options)`` builds any task in ``TASKS``. The synthetic ones live here and have a
known dependency length, so a TBPTT window can be set shorter or longer than what the task needs:

- ``echo``: delayed echo; the target at step t is the input symbol at step t - delay.
- ``adding``: the adding problem (Hochreiter & Schmidhuber, 1997, in the form of Le et al., 2015).
- ``copy``: the copy task (Hochreiter & Schmidhuber, 1997; Arjovsky et al., 2016).

The real ones (``co2``, ``sunspots``, ``text``) are in ``tbptt.data.datasets``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import Cell, RecurrentNet
from .streams import Split, packed_streams

LossFn = Callable[[Tensor, Tensor], Tensor]
MetricFn = Callable[[Tensor, Tensor, Optional[Tensor]], float]
SPLITS = ("train", "valid", "test")


def squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-step squared error ``[B, T]``, averaged over the feature dimensions."""
    return (outputs - targets).pow(2).flatten(2).mean(-1)


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-step cross-entropy in nats ``[B, T]`` of logits ``[B, T, C]`` against class ids ``[B, T]``."""
    losses = F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view(targets.shape)


def accuracy(outputs: Tensor, targets: Tensor, mask: Optional[Tensor] = None) -> float:
    """Fraction of valid steps whose highest logit is the target class."""
    return _masked_mean((outputs.argmax(-1) == targets).double(), mask)


def mean_squared_error(outputs: Tensor, targets: Tensor, mask: Optional[Tensor] = None) -> float:
    """Mean over valid steps of the per-step squared error."""
    return _masked_mean(squared_error(outputs.double(), targets.double()), mask)


def bits_per_symbol(outputs: Tensor, targets: Tensor, mask: Optional[Tensor] = None) -> float:
    """Mean cross-entropy over valid steps in bits (bits per character for character models)."""
    return _masked_mean(cross_entropy(outputs.double(), targets), mask) / math.log(2)


# eq=False: fields hold tensors, whose == is elementwise; tasks compare by identity
@dataclass(frozen=True, eq=False)
class Task:
    """A learning problem with its train/valid/test streams, loss and skill metric.

    - ``loss_fn(outputs, targets) -> [B, T]`` per-step losses, for the ``Trainer``.
    - ``metric(outputs, targets, mask)``: the skill metric over a whole split (``metric_name``,
      ``higher_is_better``); forecasting tasks report it in the series' original units.
    - ``baseline``: the metric of a trivial predictor (``baseline_name``) on "valid" and "test".
    - ``dependency``: the known distance in steps between a target and the earliest input it
      needs (a TBPTT window of ``dependency + 1`` steps spans it), None when unknown.
    - ``vocab``: the number of input token ids when inputs are ``[B, T]`` integer tokens.
    - ``scaler``: the standard scaling of forecasting tasks (fitted on train only);
      ``alphabet``: the character of each token id for text.
    """

    name: str
    n_inputs: int
    n_outputs: int
    train: Split
    valid: Split
    test: Split
    loss_fn: LossFn
    metric_name: str
    higher_is_better: bool
    baseline_name: str
    baseline: dict[str, float]
    dependency: Optional[int]
    vocab: Optional[int]
    description: str
    metric_fn: MetricFn = field(repr=False)
    scaler: Optional[Any] = None
    alphabet: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        for name in ("train", "valid", "test"):
            if not isinstance(getattr(self, name), Split):
                raise TypeError(f"Task.{name} must be a Split; got {type(getattr(self, name)).__name__}")
        if set(self.baseline) != {"valid", "test"}:
            raise ValueError(f"Task.baseline needs exactly the keys 'valid' and 'test'; got {sorted(self.baseline)}")

    def split(self, name: str) -> Split:
        """The split called ``name``: "train", "valid" or "test"."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {name!r}")
        return getattr(self, name)

    def metric(self, outputs: Tensor, targets: Tensor, mask: Optional[Tensor] = None) -> float:
        """The skill metric of ``outputs[B, T, ...]`` against ``targets`` over the valid steps."""
        if outputs.shape[:2] != targets.shape[:2]:
            raise ValueError(
                f"outputs [B, T] = {tuple(outputs.shape[:2])} do not match targets [B, T] = "
                f"{tuple(targets.shape[:2])}; pass the model's outputs over the whole split"
            )
        if mask is not None and mask.shape != targets.shape[:2]:
            raise ValueError(f"mask must be [B, T] = {tuple(targets.shape[:2])}; got {tuple(mask.shape)}")
        return float(self.metric_fn(outputs.detach(), targets, mask))

    def score(self, split: str, outputs: Tensor) -> float:
        """The skill metric of ``outputs`` over the whole split called ``split`` (its targets and mask)."""
        data = self.split(split)
        return self.metric(outputs, data.targets, data.mask)

    def model(self, hidden: int = 32, cell: Cell = "lstm", layers: int = 1) -> RecurrentNet:
        """A ``RecurrentNet`` with this task's input and output sizes (and token embedding)."""
        return RecurrentNet(self.n_inputs, hidden, self.n_outputs, cell=cell, layers=layers, vocab=self.vocab)


def echo_task(
    *, delay: int = 5, symbols: int = 8, batch_size: int = 16, steps: int = 200, eval_steps: int = 100, seed: int = 0
) -> Task:
    """Delayed echo: uniform random symbols; the target at step t is the input at t - ``delay``.
    Each split is ``batch_size`` independent streams; accuracy counts steps t >= delay only."""
    _check_ints(delay=delay, symbols=symbols, batch_size=batch_size, steps=steps, eval_steps=eval_steps)
    if min(steps, eval_steps) <= delay:
        raise ValueError(f"steps and eval_steps must exceed delay={delay} to leave steps to score; "
                         f"got steps={steps}, eval_steps={eval_steps}")

    def make(index: int, length: int) -> Split:
        x = torch.randint(symbols, (batch_size, length), generator=_generator(seed, index))
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
    _check_ints(length=length, batch_size=batch_size, sequences=sequences, eval_sequences=eval_sequences)
    if length < 2:
        raise ValueError(f"length must be at least 2 (one marker in each half); got {length}")

    def make(index: int, count: int) -> Split:
        g = _generator(seed, index)
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
    _check_ints(length=length, delay=delay, symbols=symbols, batch_size=batch_size, sequences=sequences,
                eval_sequences=eval_sequences)
    blank, go = symbols, symbols + 1
    total = 2 * length + delay
    recall = torch.zeros(total, dtype=torch.bool)
    recall[length + delay:] = True

    def make(index: int, count: int) -> Split:
        memorise = torch.randint(symbols, (count, length), generator=_generator(seed, index))
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


def _builders() -> dict[str, Callable[..., Task]]:
    # imported here: datasets.py builds its tasks on the Task defined in this module
    from . import datasets

    return {
        "echo": echo_task,
        "adding": adding_task,
        "copy": copy_task,
        "co2": datasets.co2_task,
        "sunspots": datasets.sunspots_task,
        "text": datasets.text_task,
    }


TASKS: tuple[str, ...] = ("echo", "adding", "copy", "co2", "sunspots", "text")


def task_options(name: str) -> dict[str, Any]:
    """The options task ``name`` accepts, with their defaults."""
    builder = _builder(name)
    return {p.name: p.default for p in inspect.signature(builder).parameters.values()}


def load_task(name: str, **options: Any) -> Task:
    """Build task ``name`` (one of ``TASKS``) with ``options`` (see ``task_options(name)``)."""
    builder = _builder(name)
    accepted = task_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in accepted.items())
        raise ValueError(f"task {name!r} has no option {', '.join(unknown)}; its options are: {listed}")
    return builder(**options)


def _builder(name: str) -> Callable[..., Task]:
    builders = _builders()
    if name not in builders:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return builders[name]


def _masked_mean(values: Tensor, mask: Optional[Tensor]) -> float:
    if mask is None:
        return float(values.mean())
    if not bool(mask.any()):
        raise ValueError("the mask has no valid step; a metric needs at least one")
    return float(values[mask].mean())


def _generator(seed: int, index: int) -> torch.Generator:
    """An independent generator per (seed, split): changing one split's size leaves the others."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}")
    state = np.random.SeedSequence([seed, index]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _check_ints(**values: object) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
