"""Running the model for the checks, and comparing runs.

``Runner.call`` runs the model on a piece of the sample, turns a failure into words, and records
how ``forward`` treats the state it is given (returned as it was, changed in place). Differences
are measured in a floating dtype with NaN against a number counting as infinite.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .. import state as st


def floating(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a - b|`` elementwise in a floating dtype; NaN against a number counts as infinite."""
    a, b = a.detach(), b.detach().to(a.device)
    if not floating(a):
        a, b = a.double(), b.double()
    d = (a - b).abs()
    both = torch.isnan(a) & torch.isnan(b)
    return torch.where(both, torch.zeros_like(d), torch.nan_to_num(d, nan=math.inf, posinf=math.inf))


def gap(a: Any, b: Any) -> float:
    """The largest ``|a - b|``: infinite for tensors of different shapes, or unequal other values."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return 0.0 if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b else math.inf
    if a.shape != b.shape:
        return math.inf
    return float(diff(a, b).max()) if a.numel() else 0.0


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values (NaN equal to NaN)."""
    return gap(a, b) == 0


def leaves(state: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf of a state but None, the path written as ``state['h'][0]``."""
    flat, _ = pytree.tree_flatten_with_path(state)
    return [("state" + pytree.keystr(path), leaf) for path, leaf in flat if leaf is not None]


def fresh(state: Any) -> Any:
    """A copy of the state, so that a model changing it in place cannot spoil later runs."""
    return st.map_tensors(torch.Tensor.clone, state)


def shape_problem(outputs: Any, batch: int, steps: int) -> str:
    """What is wrong with ``outputs`` for ``[B, T, ...]``, said after "the model" (empty if nothing)."""
    expected = f"[B={batch}, T={steps}, ...]"
    if not isinstance(outputs, torch.Tensor):
        return f"returned outputs of type {type(outputs).__name__}, not a tensor {expected}"
    shape = tuple(outputs.shape)
    if outputs.dim() < 2:
        return (f"returned outputs of shape {shape}, with no time dim (expected {expected}): return one output "
                "per step (the head on every step's hidden state, not on the last one only)")
    if shape[:2] == (steps, batch) and batch != steps:
        return (f"returned outputs of shape {shape}, time first: batch and time are swapped (expected {expected}); "
                "if an nn.GRU/LSTM/RNN is inside, build it with batch_first=True")
    if shape[0] != batch:
        return f"returned outputs of shape {shape}: dim 0 (batch) is {shape[0]}, expected B={batch} ({expected})"
    if shape[1] != steps:
        return (f"returned outputs of shape {shape}: dim 1 (time) is {shape[1]}, expected T={steps} ({expected}); "
                "return one output per input step (not the last step only, nor pooled over time)")
    return ""


def splits(steps: int) -> list[tuple[str, list[int]]]:
    """Where the sample is cut: the middle first (the most steps on both sides to read a failure
    from), then 1, T-1 and uneven pieces (3, 1, 2, 3, 1, ... steps, one-step pieces included)."""
    uneven: list[int] = []
    for position in itertools.accumulate(itertools.cycle((3, 1, 2))):
        if position >= steps or len(uneven) == 8:
            break
        uneven.append(position)
    lengths = "+".join(str(b - a) for a, b in zip([0, *uneven], [*uneven, steps]))
    middle = steps // 2
    return [(f"cut at {middle}", [middle]), ("cut at 1", [1]), (f"cut at {steps - 1}", [steps - 1]),
            (f"pieces {lengths}", uneven)]


class Run(NamedTuple):
    outputs: Any = None
    state: Any = None
    error: str = ""  # what went wrong, said after "the model" ("raised ..."); empty when it worked


class _Given:
    """The state passed to a call as it was: its structure, leaf objects, values and versions."""

    def __init__(self, state: Any) -> None:
        flat, self.spec = pytree.tree_flatten_with_path(state)
        self.leaves = [leaf for _, leaf in flat]
        self.values = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in self.leaves]
        self.versions = [x._version if isinstance(x, torch.Tensor) else None for x in self.leaves]


def _said(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"raised {type(error).__name__}" + (f" ({lines[0][:300]})" if lines else "")


class Runner:
    """Runs ``model`` on pieces of the sample; remembers how it treats the state it is given."""

    def __init__(self, model: nn.Module, inputs: torch.Tensor, state: Any, rel: Optional[float], reset_fn: Any) -> None:
        self.model, self.x, self.start, self.rel, self.reset_fn = model, inputs, state, rel, reset_fn
        self.batch, self.steps = int(inputs.shape[0]), int(inputs.shape[1])
        # a sub-batch: every other row, the last first (none with one row)
        self.rows = list(range(self.batch - 1, -1, -2)) if self.batch > 1 else []
        self.noise = torch.Generator().manual_seed(0)
        self.handling: dict[str, str] = {}  # first finding of each kind
        self.given_calls = 0

    def tol(self, reference: Any) -> float:
        """The tolerance for a run compared with ``reference``: scaled to its dtype and size."""
        if not floating(reference):
            return 0.0
        rel = self.rel if self.rel is not None else math.sqrt(torch.finfo(reference.dtype).eps)
        size = float(reference.detach().abs().max()) if reference.numel() else 0.0
        return rel * (1.0 + size)

    def random_like(self, t: torch.Tensor) -> torch.Tensor:
        """Standard normal numbers of ``t``'s shape, real dtype and device, from the check's own generator."""
        dtype = t.real.dtype if t.is_complex() else t.dtype
        return torch.randn(t.shape, generator=self.noise, dtype=torch.float64).to(device=t.device, dtype=dtype)

    def call(self, x: torch.Tensor, state: Any, where: str) -> Run:
        given = _Given(state) if state is not None else None
        try:
            result = self.model(x, state)
        except Exception as error:  # the model's own failure is what the check reports
            return Run(error=_said(error))
        if not (isinstance(result, tuple) and len(result) == 2):
            length = f" of length {len(result)}" if isinstance(result, tuple) else ""
            return Run(error=f"returned a {type(result).__name__}{length}, not the pair (outputs[B, T, ...], new_state)")
        if given is not None:
            self.given_calls += 1
            self._handling(given, state, result[1], where)
        return Run(result[0], result[1])

    def _handling(self, given: _Given, state: Any, new_state: Any, where: str) -> None:
        """Record a state returned as the object it was given, or changed in place."""
        if new_state is state:
            self.handling.setdefault("same", (
                f"forward returned the very state object it was given ({where}): return a new state; the engine "
                "keeps the state entering a window to run the window again, and one object shared between calls "
                "changes under it."))
        flat, spec = pytree.tree_flatten_with_path(state)
        if spec != given.spec:
            self.handling.setdefault("structure", (
                f"forward changed the structure of the state it was given in place ({where}: {given.spec.num_leaves} "
                f"leaves before the call, {spec.num_leaves} after); build a new container ({{**state, 'h': h}}, not "
                "state['h'] = h)."))
            return
        for (path, leaf), old, value, version in zip(flat, given.leaves, given.values, given.versions):
            name = "state" + pytree.keystr(path)
            part = "the state it was given" if name == "state" else f"{name} of the state it was given"
            if leaf is not old:
                self.handling.setdefault("replaced", (
                    f"forward replaced {name} inside the state it was given ({where}): the container was changed "
                    "in place; build a new one ({**state, 'h': h}, not state['h'] = h)."))
            elif isinstance(leaf, torch.Tensor) and (leaf._version != version or not same(leaf, value)):
                self.handling.setdefault("in place", (
                    f"forward changed {part} in place ({where}; |Δ| {gap(leaf, value):.2g}): "
                    "the engine keeps that state to run a window again, and its detached copies share the storage; "
                    "compute a new tensor (h = h * a + b, not h.mul_(a).add_(b))."))

    def state_gaps(self, state: Any, reference: Any) -> dict[str, tuple[float, float]]:
        """``(largest difference, tolerance)`` per leaf path of two states."""
        mine, theirs = dict(leaves(state)), dict(leaves(reference))
        return {path: (gap(mine.get(path), theirs.get(path)), self.tol(theirs.get(path)))
                for path in dict.fromkeys([*mine, *theirs])}
