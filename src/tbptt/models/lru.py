"""The Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long
Sequences").

Each layer is a diagonal complex linear recurrence with a real output:

    h_t = lambda * h_{t-1} + gamma * (B x_t)        h_t in C^N
    y_t = Re(C h_t) + D * x_t

with the exponential parametrisation ``lambda = exp(-exp(nu_log) + i exp(theta_log))`` (so
``|lambda| < 1`` for any real ``nu_log``, ``theta_log``) and the normalisation ``gamma``, trained
from ``gamma_log = log sqrt(1 - |lambda|^2)`` at initialisation, which keeps the state's variance
that of the input when ``|lambda|`` is near 1. At initialisation ``|lambda|`` is uniform on the
ring ``r_min <= |lambda| <= r_max`` (uniform in area) and its phase uniform in ``[0, max_phase]``.

The parameters are real tensors (``B`` and ``C`` as real and imaginary parts), so ``.double()``
turns the whole computation into float64 and complex128. The carried state of a layer is
``[B, 2N]``: the real parts of ``h`` then the imaginary parts.
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


class LRUBlock(Block):
    """One LRU layer followed, as in the paper's deep model, by GELU and a gated linear unit."""

    def __init__(self, width: int, state_size: int, r_min: float, r_max: float, max_phase: float) -> None:
        super().__init__()
        self.state_size = state_size
        self.state_sizes = 2 * state_size
        u1, u2 = torch.rand(state_size), torch.rand(state_size)
        modulus_sq = (u1 * (r_max**2 - r_min**2) + r_min**2).clamp_min(1e-12)  # r_min = 0, u1 = 0
        nu = -0.5 * torch.log(modulus_sq)
        self.nu_log = nn.Parameter(torch.log(nu))
        # a phase of exactly 0 would make theta_log -inf
        self.theta_log = nn.Parameter(torch.log(max_phase * u2.clamp_min(1e-6)))
        self.gamma_log = nn.Parameter(0.5 * torch.log(-torch.expm1(-2 * nu)))
        self.B_re = nn.Parameter(torch.randn(state_size, width) / math.sqrt(2 * width))
        self.B_im = nn.Parameter(torch.randn(state_size, width) / math.sqrt(2 * width))
        self.C_re = nn.Parameter(torch.randn(width, state_size) / math.sqrt(state_size))
        self.C_im = nn.Parameter(torch.randn(width, state_size) / math.sqrt(state_size))
        self.D = nn.Parameter(torch.randn(width))
        self.glu = nn.Linear(width, 2 * width)

    def eigenvalues(self) -> torch.Tensor:
        """``lambda[N]``, complex."""
        return torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.state_size
        h0 = torch.complex(state[:, :n], state[:, n:])
        gamma = torch.exp(self.gamma_log)
        # B x and Re(C h) from their real and imaginary parts: x and y are real
        bx = torch.complex(x @ self.B_re.T, x @ self.B_im.T) * gamma
        h = linear_scan(self.eigenvalues(), bx, h0)
        y = h.real @ self.C_re.T - h.imag @ self.C_im.T + self.D * x
        y = F.glu(self.glu(F.gelu(y)), dim=-1)
        last = h[:, -1]
        return y, torch.cat([last.real, last.imag], dim=1)


class LRU(LayerStack):
    """A deep LRU network (Orvieto et al. 2023) with a linear head on every step.

    A linear encoder to ``hidden`` features, then ``layers`` residual blocks
    ``u + GLU(GELU(LRU(LayerNorm(u))))``, then a LayerNorm and the head.
    ``forward(x[B, T, n_inputs], state=None) -> (y[B, T, n_outputs], state)``; the state is a tuple
    of each layer's ``[B, 2 * state_size]`` (real then imaginary parts of its complex state).

    Args:
        n_inputs, hidden, n_outputs: feature sizes of the inputs, the model's width and the outputs.
        layers: number of LRU blocks.
        state_size: the complex state's size N per layer (default ``hidden``).
        r_min, r_max: the ring of ``|lambda|`` at initialisation, ``0 <= r_min < r_max < 1``.
        max_phase: the largest phase of ``lambda`` at initialisation (radians).
    """

    def __init__(self, n_inputs: int, hidden: int, n_outputs: int, layers: int = 1,
                 state_size: Optional[int] = None, r_min: float = 0.9, r_max: float = 0.999,
                 max_phase: float = 2 * math.pi) -> None:
        state_size = hidden if state_size is None else state_size
        check_sizes(n_inputs=n_inputs, hidden=hidden, n_outputs=n_outputs, layers=layers, state_size=state_size)
        positive_number(max_phase, "max_phase")
        _check_ring(r_min, r_max)
        blocks = [LRUBlock(hidden, state_size, r_min, r_max, max_phase) for _ in range(layers)]
        super().__init__(n_inputs, hidden, n_outputs, blocks, encoder=nn.Linear(n_inputs, hidden), final_norm=True)


def _check_ring(r_min: float, r_max: float) -> None:
    for name, value in (("r_min", r_min), ("r_max", r_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise InvalidArgument(name, value, "a number in [0, 1) (a modulus of the eigenvalues)")
    if not r_min < r_max:
        raise InvalidArgument("r_max", r_max, f"greater than r_min = {r_min!r}")
