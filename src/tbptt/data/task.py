"""What a task is: data split three ways, a per-step loss, a skill metric and the trivial baseline
to beat; the losses and metrics the built-in tasks use."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import LossFn, Metric
from ..models import Cell, build_model
from ..validate import non_negative_int, one_of
from .streams import Split

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
    return masked_mean((outputs.argmax(-1) == targets).double(), mask)


def mean_squared_error(outputs: Tensor, targets: Tensor, mask: Optional[Tensor] = None) -> float:
    """Mean over valid steps of the per-step squared error."""
    return masked_mean(squared_error(outputs.double(), targets.double()), mask)


def bits_per_symbol(outputs: Tensor, targets: Tensor, mask: Optional[Tensor] = None) -> float:
    """Mean cross-entropy over valid steps in bits (bits per character for character models)."""
    return masked_mean(cross_entropy(outputs.double(), targets), mask) / math.log(2)


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
    - ``segment_length``, ``epochs``: suggested steps per ``train_on`` call and passes over the
      training streams, for tasks whose splits are long (a real text); None: no suggestion.
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
    metric_fn: Metric = field(repr=False)
    scaler: Optional[Any] = None
    alphabet: Optional[tuple[str, ...]] = None
    segment_length: Optional[int] = None
    epochs: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("train", "valid", "test"):
            if not isinstance(getattr(self, name), Split):
                raise TypeError(f"Task.{name} must be a Split; got {type(getattr(self, name)).__name__}")
        if set(self.baseline) != {"valid", "test"}:
            raise ValueError(f"Task.baseline needs exactly the keys 'valid' and 'test'; got {sorted(self.baseline)}")

    def split(self, name: str) -> Split:
        """The split called ``name``: "train", "valid" or "test"."""
        one_of(name, "split", SPLITS)
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

    def model(self, hidden: int = 32, name: str = "lstm", layers: Optional[int] = None, *,
              cell: Optional[Cell] = None, **options: Any) -> nn.Module:
        """The model ``name`` (a key of ``tbptt.models.MODELS`` or ``"path/to/file.py:factory"``) with
        this task's input and output sizes, built by ``tbptt.models.build_model``.

        Token inputs (``vocab``): lstm, gru and rnn are a ``RecurrentNet`` with its own embedding;
        any other model is built for ``n_inputs`` float features and fed through a learned
        ``TokenEmbedding(vocab, n_inputs)``. ``layers`` (when given) and ``options`` go to the
        model's constructor or factory. ``cell`` is the former name of ``name`` (lstm, gru, rnn).
        """
        if cell is not None:
            if name not in ("lstm", cell):
                raise ValueError(f"give the model once: name={name!r} or cell={cell!r}, not both")
            name = cell
        if layers is not None:
            options["layers"] = layers
        return build_model(name, self.n_inputs, self.n_outputs, hidden, vocab=self.vocab, **options)


def masked_mean(values: Tensor, mask: Optional[Tensor]) -> float:
    if mask is None:
        return float(values.mean())
    if not bool(mask.any()):
        raise ValueError("the mask has no valid step; a metric needs at least one")
    return float(values[mask].mean())


def split_generator(seed: int, index: int) -> torch.Generator:
    """An independent generator per (seed, split): changing one split's size leaves the others."""
    seed = non_negative_int(seed, "seed")
    state = np.random.SeedSequence([seed, index]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))
