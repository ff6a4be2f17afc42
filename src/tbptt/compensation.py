"""ARTBP's compensation: the gradient through the weights' use ``j`` steps before the block, times
``q**-j`` (``artbp.py``).

Derivation. Let the window run steps ``u = S .. T-1`` from the constant state ``s_S`` (the block is
``[P, T)``, ``S = P - J``), ``s_{u+1} = f(s_u, x_u, theta)``, and let ``delta_{u+1}`` be the gradient
of the update's loss with respect to ``s_{u+1}``. The weights' use at step ``u`` contributes
``delta_{u+1} . df/dtheta(u)`` (plus, inside the block, its output's error). Multiply the gradient
that flows back across the state at every position ``P, P-1, ..., S+1`` by ``1/q``: the gradient
reaching ``s_{u+1}`` for ``u = P - j`` has crossed the ``j`` positions ``P, ..., P-j+1``, so it is
``q**-j delta_{u+1}``, and so is that step's contribution, everything else being linear in it; the
block's steps cross none and keep factor one. This needs the state between the steps before the
block, so those run one step per model call; the block's own steps keep their fused calls.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch

from . import state as st

Factor = Union[float, Callable[[], float]]


class _ScaleGradient(torch.autograd.Function):
    """The identity, whose gradient is multiplied by ``factor`` (a number, or a function of none
    called when the backward runs)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: Factor) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * (ctx.factor() if callable(ctx.factor) else ctx.factor), None


def scale_gradient(state: st.State, factor: Factor) -> st.State:
    """The same state, the gradient flowing back through each of its tensors multiplied by ``factor``
    (a number, or a function of none read when the backward runs: float16's loss scale)."""
    return st.map_tensors(lambda x: _ScaleGradient.apply(x, factor) if x.requires_grad else x, state)


def run_compensated(
    call: Callable[[torch.Tensor, st.State], tuple[torch.Tensor, st.State]],
    inputs: torch.Tensor,
    state: st.State,
    factor: float,
) -> tuple[torch.Tensor, st.State]:
    """Run ``inputs[B, T, ...]`` (steps before the block, no reset among them but at the first) one
    step per call from ``state``, the gradient through the state after each step times ``factor``."""
    outputs = []
    for t in range(inputs.shape[1]):
        out, state = call(inputs[:, t : t + 1], state)
        state = scale_gradient(state, factor)
        outputs.append(out)
    return torch.cat(outputs, dim=1), state


def uniforms(generator: torch.Generator) -> Callable[[], float]:
    """Independent uniform draws in (0, 1] from ``generator`` (ARTBP's, which the engine owns)."""
    return lambda: 1.0 - float(torch.rand((), generator=generator, dtype=torch.float64))
