"""Small recurrent models with different state nestings, and a per-step loss, for the tests."""

from __future__ import annotations

import torch
from torch import nn


class LSTMHead(nn.Module):
    """nn.LSTM (fused kernel, state (h, c) with batch in dimension 1) and a linear head."""

    def __init__(self, n_in: int = 3, hidden: int = 5, n_out: int = 2, layers: int = 1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(n_in, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x, state):
        out, state = self.lstm(x, state)
        return self.head(out), state


class GRUCellLoop(nn.Module):
    """Two stacked GRUCells stepped in a Python loop; the state is a tuple (h1, h2)."""

    def __init__(self, n_in: int = 3, hidden: int = 4, n_out: int = 2) -> None:
        super().__init__()
        self.hidden = hidden
        self.cell1 = nn.GRUCell(n_in, hidden)
        self.cell2 = nn.GRUCell(hidden, hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x, state):
        if state is None:
            z = x.new_zeros(x.shape[0], self.hidden)
            state = (z, z)
        h1, h2 = state
        outs = []
        for t in range(x.shape[1]):
            h1 = self.cell1(x[:, t], h1)
            h2 = self.cell2(h1, h2)
            outs.append(self.head(h2))
        return torch.stack(outs, dim=1), (h1, h2)


class DictStateRNN(nn.Module):
    """A tanh RNN with a leaky memory; the state is a nested dict {"h": ..., "mem": {"m": ...}}."""

    def __init__(self, n_in: int = 3, hidden: int = 4, n_out: int = 2) -> None:
        super().__init__()
        self.hidden = hidden
        self.inp = nn.Linear(n_in, hidden)
        self.rec = nn.Linear(hidden, hidden, bias=False)
        self.mix = nn.Parameter(torch.tensor(0.3))
        self.head = nn.Linear(2 * hidden, n_out)

    def forward(self, x, state):
        if state is None:
            z = x.new_zeros(x.shape[0], self.hidden)
            state = {"h": z, "mem": {"m": z}}
        h, m = state["h"], state["mem"]["m"]
        outs = []
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
            m = torch.sigmoid(self.mix) * m + (1 - torch.sigmoid(self.mix)) * h
            outs.append(self.head(torch.cat([h, m], dim=-1)))
        return torch.stack(outs, dim=1), {"h": h, "mem": {"m": m}}


MODELS = {"lstm": LSTMHead, "grucell": GRUCellLoop, "dict": DictStateRNN}


def make_model(kind: str, seed: int, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind]().to(dtype)


def mse_steps(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-step squared error [B, T]."""
    return ((outputs - targets) ** 2).mean(dim=-1)


def make_data(seed: int, batch: int, n: int, dtype=torch.float64, n_in: int = 3, n_out: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, n_in, generator=g, dtype=dtype)
    y = torch.randn(batch, n, n_out, generator=g, dtype=dtype)
    return x, y


def oracle_updates(n: int, k1, k2, errors: str) -> list[tuple[int, int, int]]:
    """Updates of TBPTT(k1, k2) written straight from SEMANTICS.md, 1-based as there, returned
    0-based half-open: updates at T = k1, 2k1, ...; window (T-k2, T]; errors (max(P, T-k2), T];
    a last block cut short at n keeps its full block's window and errors, clipped at n."""
    block = n if k1 is None else k1
    out = []
    previous = 0
    full_end = block
    while previous < n:
        lo = 1 if k2 is None else max(1, full_end - k2 + 1)  # first step of the window (1-based)
        first_error = lo if errors == "window" else max(previous + 1, lo)
        last = min(full_end, n)
        if first_error <= last:
            out.append((lo - 1, first_error - 1, last))
        previous = full_end
        full_end += block
    return out
