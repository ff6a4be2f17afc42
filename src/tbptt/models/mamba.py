"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces").

One block, on ``u[B, T, hidden]`` with ``E = expand * hidden`` channels and ``N = state_size``:

    x, z  = in_proj(u)                                        two [B, T, E]
    x     = SiLU(causal depthwise conv of width W over x)
    delta = softplus(dt_proj(.)), B_t, C_t = x_proj(x)      input-dependent: the selection
    A     = -exp(A_log)                                       [E, N], real and negative
    h_t   = exp(delta_t A) * h_{t-1} + (exp(delta_t A) - 1) / A * B_t * x_t       zero-order hold
    y_t   = (C_t . h_t) + D * x_t,   out = out_proj(y * SiLU(z))

The discretisation is the paper's zero-order hold for both ``A`` and ``B`` (eq. 4; exact for a
diagonal ``A``, with ``expm1``); the authors' fused kernel simplifies ``B``'s to ``delta * B``. The
initialisation follows the paper: ``A`` the S4D-real ``1..N`` per channel, ``softplus(dt bias)``
log-uniform in ``[dt_min, dt_max]``, ``D = 1``.

The state of a block carries what the next step needs: the convolution's last ``W - 1`` inputs
(``[B, (W - 1) * E]``, oldest first) and the SSM state (``[B, E * N]``), so a segment continues
exactly where the previous one stopped (zero-padding the convolution on every call would not). The
recurrence runs through ``tbptt.models.scan.linear_scan``: its input terms have either sign, so a
log-space scan would need complex logarithms, while the linear one only multiplies the same factors
in ``(0, 1]`` as a per-step loop.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..validate import InvalidArgument, positive_number
from .scan import linear_scan
from .stack import Block, LayerStack, check_sizes


class MambaBlock(Block):
    """One selective state-space block (no normalisation or residual; see ``Mamba``)."""

    def __init__(self, width: int, state_size: int, conv_width: int, expand: int, dt_rank: int,
                 dt_min: float, dt_max: float) -> None:
        super().__init__()
        channels = expand * width
        self.channels, self.state_size, self.conv_width = channels, state_size, conv_width
        self.state_sizes = ((conv_width - 1) * channels, channels * state_size)
        self.in_proj = nn.Linear(width, 2 * channels, bias=False)
        self.conv = nn.Conv1d(channels, channels, conv_width, groups=channels)
        self.x_proj = nn.Linear(channels, dt_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(dt_rank, channels)
        nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
        dt = torch.exp(torch.rand(channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp_min(1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state_size + 1, dtype=torch.float32)).repeat(channels, 1))
        self.D = nn.Parameter(torch.ones(channels))
        self.out_proj = nn.Linear(channels, width, bias=False)

    def forward(self, u: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        batch, steps, _ = u.shape
        history, h0 = state
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x, history = self._causal_conv(x, history.reshape(batch, self.conv_width - 1, self.channels))
        x = F.silu(x)
        rank = self.dt_proj.in_features
        dt_in, B, C = self.x_proj(x).split([rank, self.state_size, self.state_size], dim=-1)
        delta = F.softplus(self.dt_proj(dt_in))  # [B, T, E]
        A = -torch.exp(self.A_log)  # [E, N]
        delta_A = delta.unsqueeze(-1) * A  # [B, T, E, N]
        b = torch.expm1(delta_A) / A * B.unsqueeze(2) * x.unsqueeze(-1)
        h = linear_scan(torch.exp(delta_A), b, h0.reshape(batch, self.channels, self.state_size))
        y = torch.einsum("bten,btn->bte", h, C) + self.D * x
        out = self.out_proj(y * F.silu(z))
        return out, (history.reshape(batch, -1), h[:, -1].reshape(batch, -1))

    def _causal_conv(self, x: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The convolution over ``x[B, T, E]`` preceded by the carried inputs, and the last
        ``W - 1`` inputs to carry on."""
        extended = torch.cat([history, x], dim=1)  # [B, W - 1 + T, E]
        out = self.conv(extended.transpose(1, 2)).transpose(1, 2)  # no padding: T outputs, causal
        return out, extended[:, extended.shape[1] - (self.conv_width - 1):]


class Mamba(LayerStack):
    """A stack of Mamba blocks (Gu & Dao 2023) with a linear head on every step.

    A linear encoder to ``hidden`` features, then ``layers`` residual blocks
    ``u + MambaBlock(LayerNorm(u))``, then a LayerNorm and the head.
    ``forward(x[B, T, n_inputs], state=None) -> (y[B, T, n_outputs], state)``; the state is a tuple
    with, per layer, ``(conv_inputs[B, (conv_width - 1) * E], ssm[B, E * state_size])``.

    Args:
        n_inputs, hidden, n_outputs: feature sizes of the inputs, the model's width and the outputs.
        layers: number of blocks.
        state_size: the SSM state size N per channel.
        conv_width: width W of the causal depthwise convolution.
        expand: channels per block as a multiple of ``hidden`` (E = expand * hidden).
        dt_rank: rank of the projection that makes delta (default ``ceil(hidden / 16)``).
        dt_min, dt_max: the range of delta at initialisation.
    """

    def __init__(self, n_inputs: int, hidden: int, n_outputs: int, layers: int = 1, state_size: int = 16,
                 conv_width: int = 4, expand: int = 2, dt_rank: Optional[int] = None,
                 dt_min: float = 0.001, dt_max: float = 0.1) -> None:
        dt_rank = math.ceil(hidden / 16) if dt_rank is None else dt_rank
        check_sizes(n_inputs=n_inputs, hidden=hidden, n_outputs=n_outputs, layers=layers, state_size=state_size,
                    conv_width=conv_width, expand=expand, dt_rank=dt_rank)
        positive_number(dt_min, "dt_min")
        if positive_number(dt_max, "dt_max") < dt_min:
            raise InvalidArgument("dt_max", dt_max, f"at least dt_min = {dt_min!r}")
        blocks = [MambaBlock(hidden, state_size, conv_width, expand, dt_rank, dt_min, dt_max) for _ in range(layers)]
        super().__init__(n_inputs, hidden, n_outputs, blocks, encoder=nn.Linear(n_inputs, hidden), final_norm=True)
