"""What the contenders of a row train: a model's initial weights, the streams, the loss and the
optimizer, shared by every contender so that they do the same arithmetic."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ..models import RecurrentNet


def per_step_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-step squared error averaged over features, ``[B, T]``."""
    return (outputs - targets).pow(2).mean(dim=-1)


class _Training:
    """What every workload trains with: plain SGD at its ``lr``, on its ``device``."""

    lr: float
    device: torch.device

    def optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


class Workload(_Training):
    """One model's initial weights and ``batch`` streams of ``n`` steps (inputs and regression
    targets), shared by every contender of a row; seeded, so every row sees the same numbers."""

    def __init__(self, batch: int, inputs: int, hidden: int, outputs: int, n: int,
                 device: str = "cpu", seed: int = 0, lr: float = 1e-3) -> None:
        self.batch, self.n_inputs, self.hidden, self.n_outputs, self.n = batch, inputs, hidden, outputs, n
        self.device = torch.device(device)
        self.lr = lr
        torch.manual_seed(seed)
        template = RecurrentNet(inputs, hidden, outputs, cell="lstm")
        self.weights = {k: v.clone() for k, v in template.state_dict().items()}
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(batch, n, inputs, generator=generator).to(self.device)
        self.targets = torch.randn(batch, n, outputs, generator=generator).to(self.device)

    loss_fn = staticmethod(per_step_mse)
    clip: Optional[float] = None
    description = "RecurrentNet (nn.LSTM + linear head), per-step MSE, SGD"

    def model(self) -> RecurrentNet:
        model = RecurrentNet(self.n_inputs, self.hidden, self.n_outputs, cell="lstm").to(self.device)
        model.load_state_dict(self.weights)
        return model



class WordLM(nn.Module):
    """The word-level language model of pytorch/examples' word_language_model, batch first:
    embedding, dropout, a stacked nn.LSTM (dropout between layers), dropout, decoder to the vocabulary."""

    def __init__(self, vocab: int, embedding: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, embedding)
        self.drop = nn.Dropout(dropout)
        self.rnn = nn.LSTM(embedding, hidden, layers, dropout=dropout if layers > 1 else 0.0, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        hidden, state = self.rnn(self.drop(self.encoder(tokens)), state)
        return self.decoder(self.drop(hidden)), state


def token_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-step cross-entropy ``[B, T]`` of logits ``[B, T, V]`` against token ids ``[B, T]``."""
    return nn.functional.cross_entropy(outputs.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


class WordLMWorkload(_Training):
    """The word-LM configuration (Zaremba et al.'s small setting as pytorch/examples trains it): a
    synthetic stream of ``vocab`` token ids in ``batch`` rows, SGD at lr 20 with the gradient norm
    clipped to 0.25, dropout 0.2. Same interface as ``Workload``."""

    description = "word LM (embedding, 2-layer nn.LSTM, decoder to the vocabulary), cross-entropy, SGD lr 20, clip 0.25"

    def __init__(self, batch: int = 20, vocab: int = 18000, embedding: int = 128, hidden: int = 128, layers: int = 2,
                 n: int = 350, dropout: float = 0.2, lr: float = 20.0, clip: float = 0.25, device: str = "cpu",
                 seed: int = 0) -> None:
        self.batch, self.vocab, self.n, self.hidden = batch, vocab, n, hidden
        self.sizes = (vocab, embedding, hidden, layers, dropout)
        self.device = torch.device(device)
        self.lr, self.clip = lr, clip
        torch.manual_seed(seed)
        self.weights = {k: v.clone() for k, v in WordLM(*self.sizes).state_dict().items()}
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(vocab, (batch, n + 1), generator=generator).to(self.device)
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]

    loss_fn = staticmethod(token_cross_entropy)

    def model(self) -> WordLM:
        model = WordLM(*self.sizes).to(self.device)
        model.load_state_dict(self.weights)
        return model

