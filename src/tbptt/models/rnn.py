"""RecurrentNet: a fused nn.LSTM/GRU/RNN (batch first) with a linear head, the model the tasks, the
CLI and the benchmarks use by default."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

Cell = Literal["lstm", "gru", "rnn"]
_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class RecurrentNet(nn.Module):
    """A fused nn.LSTM/GRU/RNN (batch first) with a linear head on every step.

    ``vocab``: when given, inputs are ``[B, T]`` integer tokens fed through an embedding of
    ``n_inputs`` features (character-level language models).
    """

    def __init__(
        self,
        n_inputs: int,
        hidden: int,
        n_outputs: int,
        cell: Cell = "lstm",
        layers: int = 1,
        vocab: Optional[int] = None,
    ) -> None:
        super().__init__()
        if cell not in _CELLS:
            raise ValueError(f"cell must be one of {tuple(_CELLS)}; got {cell!r}")
        for name, value in (("n_inputs", n_inputs), ("hidden", hidden), ("n_outputs", n_outputs), ("layers", layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self.embedding = nn.Embedding(vocab, n_inputs) if vocab is not None else None
        self.rnn = _CELLS[cell](n_inputs, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, n_outputs)

    def forward(self, inputs: torch.Tensor, state=None):
        x = self.embedding(inputs) if self.embedding is not None else inputs
        out, state = self.rnn(x, state)
        return self.head(out), state
