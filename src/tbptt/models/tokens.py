"""Token inputs for any model: an embedding in front of a model that reads float features."""

from __future__ import annotations

import torch
from torch import nn


class TokenEmbedding(nn.Module):
    """``model`` fed ``[B, T]`` integer tokens through a learned ``nn.Embedding(vocab, n_inputs)``.

    ``forward(tokens[B, T], state)`` returns ``model(embedding(tokens), state)``: the state is the
    wrapped model's, untouched, so it keeps the engine's contract exactly when ``model`` does.
    The tasks whose inputs are tokens (``echo``, ``copy``, ``text``) put it in front of every model
    but ``RecurrentNet``, which has its own (``vocab=``).
    """

    def __init__(self, vocab: int, n_inputs: int, model: nn.Module) -> None:
        super().__init__()
        for name, value in (("vocab", vocab), ("n_inputs", n_inputs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        self.embedding = nn.Embedding(vocab, n_inputs)
        self.model = model

    def forward(self, tokens: torch.Tensor, state=None):
        return self.model(self.embedding(tokens), state)
