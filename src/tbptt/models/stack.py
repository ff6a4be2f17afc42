"""The frame the scan models share: layers of one recurrent block each, a linear head, and a state
that is one entry per layer.

Every leaf of the state is a 2-D ``[B, features]`` tensor, so ``tbptt.state.batch_dim`` finds the
batch in dimension 0 whatever B is (a 3-D ``[B, X, Y]`` leaf would be read in nn.RNN's layout when
``X == B``). A fresh stream (``state=None``) starts from zeros, which is also what
``tbptt.state.reset_rows`` writes, so a reset row restarts exactly like a new stream.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..validate import positive_int

LayerState = Any
"""One layer's state: a ``[B, features]`` tensor or a tuple of them."""


class Block(nn.Module):
    """One recurrent layer: ``forward(x[B, T, F], state) -> (y[B, T, width], state)``.

    ``state_sizes`` gives the feature size of each leaf of the layer's state: an int for a single
    tensor, a tuple of ints for a tuple of tensors.
    """

    state_sizes: Any

    def zero_state(self, batch: int, like: torch.Tensor) -> LayerState:
        """The state of a fresh stream: zeros of ``like``'s dtype and device."""
        sizes = self.state_sizes
        if isinstance(sizes, int):
            return like.new_zeros(batch, sizes)
        return tuple(like.new_zeros(batch, size) for size in sizes)


class LayerStack(nn.Module):
    """``encoder`` (or none), then ``blocks`` with pre-norm residual connections, then a linear head.

    With ``encoder=None`` the first block reads the inputs directly and its output is not added to
    them (its width differs); every later block ``l`` computes ``u + block_l(LayerNorm(u))``.
    """

    def __init__(self, n_inputs: int, hidden: int, n_outputs: int, blocks: Sequence[Block],
                 encoder: Optional[nn.Module], final_norm: bool) -> None:
        super().__init__()
        self.n_inputs, self.hidden, self.n_outputs = n_inputs, hidden, n_outputs
        self.encoder = encoder
        self.blocks = nn.ModuleList(blocks)
        direct = 1 if encoder is None else 0
        self.norms = nn.ModuleList(
            [nn.Identity() if i < direct else nn.LayerNorm(hidden) for i in range(len(blocks))]
        )
        self.final_norm = nn.LayerNorm(hidden) if final_norm else nn.Identity()
        self.head = nn.Linear(hidden, n_outputs)

    def forward(self, inputs: torch.Tensor, state: Optional[tuple] = None) -> tuple[torch.Tensor, tuple]:
        """``(outputs[B, T, n_outputs], state)`` from ``inputs[B, T, n_inputs]``; ``state=None``
        starts a stream, otherwise it is the state an earlier call returned (one entry per layer)."""
        _check_inputs(inputs, self.n_inputs)
        batch = inputs.shape[0]
        if state is None:
            state = tuple(block.zero_state(batch, inputs) for block in self.blocks)
        else:
            self._check_state(state, batch)
        u = inputs if self.encoder is None else self.encoder(inputs)
        new_state = []
        for i, (block, norm, entering) in enumerate(zip(self.blocks, self.norms, state)):
            y, leaving = block(norm(u), entering)
            u = y if i == 0 and self.encoder is None else u + y
            new_state.append(leaving)
        return self.head(self.final_norm(u)), tuple(new_state)

    def _check_state(self, state: Any, batch: int) -> None:
        expected = tuple(block.zero_state(batch, torch.empty(0)) for block in self.blocks)
        want = [tuple(leaf.shape) for leaf in pytree.tree_leaves(expected)]
        ok = isinstance(state, (tuple, list)) and len(state) == len(expected)
        if ok:
            leaves, spec = pytree.tree_flatten(tuple(state))
            ok = spec == pytree.tree_structure(expected) and all(
                isinstance(leaf, torch.Tensor) and tuple(leaf.shape) == shape for leaf, shape in zip(leaves, want)
            )
        if not ok:
            got = pytree.tree_map(lambda x: tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__, state)
            raise ValueError(
                f"state must be the state this {type(self).__name__} returned for {batch} streams (one entry per "
                f"layer, leaf shapes {want}) or None to start new streams; got {got}"
            )


def _check_inputs(inputs: Any, n_inputs: int) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3 or inputs.shape[2] != n_inputs or inputs.shape[1] < 1:
        got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a tensor [B, T, {n_inputs}] with T >= 1 (batch first); got {got}")


def check_sizes(**sizes: int) -> None:
    """Each keyword a positive int, with an error that names it."""
    for name, value in sizes.items():
        positive_int(value, name)
