"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?").

Gates that read only the input make each layer a linear recurrence in its hidden state,
``h_t = a_t * h_{t-1} + b_t``, which a segment solves with a parallel scan. The paper's log-space
form keeps every term positive: the candidate state goes through ``g(x) = x + 1/2`` for ``x >= 0``
and ``sigmoid(x)`` below, and the scan runs on ``log a_t`` and ``log b_t``.

- minGRU: ``z_t = sigmoid(k_t)``, ``h_t = (1 - z_t) * h_{t-1} + z_t * g(h~_t)``;
  ``log(1 - z) = -softplus(k)``, ``log z = -softplus(-k)``.
- minLSTM: ``f_t = sigmoid(k^f_t)``, ``i_t = sigmoid(k^i_t)``, normalised to ``f' = f / (f + i)``,
  ``i' = i / (f + i)``; ``h_t = f'_t * h_{t-1} + i'_t * g(h~_t)``; with
  ``d = softplus(-k^f) - softplus(-k^i)``: ``log f' = -softplus(d)``, ``log i' = -softplus(-d)``.

``k`` and ``h~`` are one linear map of the layer's input. The carried state is the last ``h`` of
each layer.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..validate import one_of
from .scan import linear_scan, log_scan
from .stack import Block, LayerStack, check_sizes

Scan = Literal["log", "linear"]
SCANS = ("log", "linear")


def log_g(x: torch.Tensor) -> torch.Tensor:
    """``log g(x)``: ``log(x + 1/2)`` for ``x >= 0``, ``log sigmoid(x)`` below (both branches finite)."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


class _MinBlock(Block):
    """One minGRU/minLSTM layer: ``gates`` linear maps of the input, then the scan."""

    gates: int

    def __init__(self, n_inputs: int, hidden: int, scan: Scan, chunk: int) -> None:
        super().__init__()
        self.state_sizes = hidden
        self.scan, self.chunk = scan, chunk
        self.proj = nn.Linear(n_inputs, self.gates * hidden)

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log a, log b)`` of the layer's recurrence for inputs ``x[B, T, F]``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_a, log_b = self.coefficients(x)
        if self.scan == "log":
            h = log_scan(log_a, log_b, h0, chunk=self.chunk)
        else:
            h = linear_scan(torch.exp(log_a), torch.exp(log_b), h0)
        return h, h[:, -1]


class MinGRUBlock(_MinBlock):
    """A minGRU layer."""

    gates = 2

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, candidate = self.proj(x).chunk(2, dim=-1)
        return -F.softplus(k), -F.softplus(-k) + log_g(candidate)


class MinLSTMBlock(_MinBlock):
    """A minLSTM layer."""

    gates = 3

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_forget, k_input, candidate = self.proj(x).chunk(3, dim=-1)
        d = F.softplus(-k_forget) - F.softplus(-k_input)
        return -F.softplus(d), -F.softplus(-d) + log_g(candidate)


class _MinRNN(LayerStack):
    block: type[_MinBlock]

    def __init__(self, n_inputs: int, hidden: int, n_outputs: int, layers: int = 1,
                 scan: Scan = "linear", chunk: int = 16) -> None:
        check_sizes(n_inputs=n_inputs, hidden=hidden, n_outputs=n_outputs, layers=layers, chunk=chunk)
        one_of(scan, "scan", SCANS)
        blocks = [self.block(n_inputs if i == 0 else hidden, hidden, scan, chunk) for i in range(layers)]
        super().__init__(n_inputs, hidden, n_outputs, blocks, encoder=None, final_norm=False)


class MinGRU(_MinRNN):
    """Stacked minGRU layers (Feng et al. 2024) with a linear head on every step.

    ``forward(x[B, T, n_inputs], state=None) -> (y[B, T, n_outputs], state)``; the state is a tuple
    of each layer's last hidden state ``[B, hidden]``. The first layer reads the inputs; each later
    layer adds its output to its input, which it reads through a LayerNorm.

    Args:
        n_inputs, hidden, n_outputs: feature sizes of the inputs, the hidden states and the outputs.
        layers: number of minGRU layers.
        scan: ``"linear"`` (default), the recurrence scanned on ``a`` and ``b`` themselves (stable:
            every ``a`` lies in (0, 1); measured more accurate in float32 and about 12x faster than the
            log-space form on CPU, ``docs/models.md``); or ``"log"``, the paper's log-space scan, in
            chunks of ``chunk`` steps.
        chunk: steps per chunk of the log-space scan (a shorter chunk is more accurate in float32).
    """

    block = MinGRUBlock


class MinLSTM(_MinRNN):
    """Stacked minLSTM layers (Feng et al. 2024) with a linear head on every step.

    Arguments, layers and state as ``MinGRU``; each layer has a forget and an input gate,
    normalised to sum to one, in place of minGRU's single update gate.
    """

    block = MinLSTMBlock
