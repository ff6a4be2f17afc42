"""``check_model``: does a model keep the engine's contract? Found by experiment on a sample batch.

The engine assumes that running steps ``[0, a)`` then ``[a, b)`` with the state carried equals
running ``[0, b)`` in one call, that each row is a stream of its own, and that gradients flow
through the state one call returns into the next. Models break this silently (a time-first
``nn.GRU`` fed batch-first inputs, a convolution zero-padded on every call, a state detached inside
``forward``). Each check runs the model on the user's sample and says what is wrong, where, by how
much, and the likely fix. Nothing is assumed about the state's layout: a leaf's batch dim is the
one whose size follows the rows when the sample is cut to fewer of them.

- ``segments``: the call, its output shape, finiteness, determinism, and the sample cut into pieces;
- ``layout``: batch independence, the state's leaves and batch dims, the gradient through the state,
  the state passed in;
- ``runner``: running the model and comparing runs; ``report``: the ``ModelReport``.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .. import state as st
from .. import validate
from . import layout as _layout
from . import segments as _segments
from .report import Check as Check
from .report import ModelContractError as ModelContractError
from .report import ModelReport as ModelReport
from .runner import Runner, fresh, same

MIN_STEPS = 8
"""The shortest sample the checks can use: cuts at 1, T/2 and T-1 with steps on both sides (to tell a
model that looks ahead from a state that misses history). Rows: one will do, but the checks that
rows are independent streams and of each state leaf's batch dim need 2 or more."""


def check_model(
    model: nn.Module,
    inputs: torch.Tensor,
    state: st.State = None,
    *,
    tolerance: Optional[float] = None,
    reset_fn: Optional[Callable[[Any, torch.Tensor], Any]] = None,
) -> ModelReport:
    """Check by experiment that ``model`` keeps the engine's contract on a real sample batch.

    ``inputs[B, T, ...]`` (T >= 8; B >= 2 for the checks of the rows) runs from ``state`` (None: how a stream starts) in one
    call and in pieces with the state carried (cut at T/2, 1 and T-1, and into uneven pieces of
    3, 1, 2, ... steps); outputs and final states must agree within ``tolerance`` times (1 + their
    largest magnitude) (default: the square root of the dtype's epsilon). Also checked: the output
    shape, finite outputs, determinism in eval mode, that a row's outputs do not depend on the
    other rows, each state leaf's batch dim (and that resets find it: ``tbptt.state.batch_dim``,
    or ``reset_fn`` when given), that the gradient reaches the carried state, that the state passed
    in is neither returned nor changed in place, and that ``forward`` writes no parameter or buffer.

    A state that the next call ignores is a note when the pieces still agree with one call (the
    model keeps no memory across calls: TBPTT changes nothing for it) and a problem when they do
    not; an integer or bool state leaf is a note (the engine handles it, but no gradient passes).

    The model runs in eval mode under a forked RNG; every module's mode, the weights, buffers and
    ``.grad`` are left as they were. Steps and rows in the report are 0-based.

    Example::

        report = tbptt.check_model(model, x[:8, :64])
        print(report)          # every check and its measured error
        assert report.ok, report.problems
    """
    _check_arguments(model, inputs, reset_fn)
    rel = validate.positive_number(tolerance, "tolerance", "relative", none="the square root of the dtype's epsilon")
    devices = sorted({t.device.index for t in (inputs, *model.parameters(), *model.buffers()) if t.is_cuda})
    with _isolated(model, devices) as changed, torch.no_grad():  # the gradient check enables it for itself
        checks = _checks(Runner(model, inputs, state, rel, reset_fn))
    checks.append(_weights_check(changed))
    dtype = str(inputs.dtype).replace("torch.", "")
    sample = f"inputs {tuple(inputs.shape)} {dtype}, state {'None' if state is None else 'given'}"
    return ModelReport(type(model).__name__, sample, tuple(checks))


def _checks(run: Runner) -> list[Check]:
    full = run.call(run.x, fresh(run.start), "the sample in one call")
    checks = _segments.check_call(run, full)
    if any(c.passed is False for c in checks if c.name in ("call", "output shape", "finite")):
        return [*checks, Check("other checks", "not run: the sample must run first", passed=None)]
    repeat = _segments.check_repeat(run, full)
    if repeat.passed is False:
        return [*checks, repeat, Check("other checks", "not run: they compare runs of the model", passed=None)]
    sub, found = _layout.layout(run, full)
    splits = _segments.check_splits(run, full, _layout.time_first_hint(found))
    consistent = all(c.passed for c in splits)
    return [*checks, repeat, *splits, _layout.check_batch(run, full, sub, found),
            _layout.check_state(run, full, found), _layout.check_gradient(run, full, consistent),
            _layout.check_handling(run)]


def _check_arguments(model: Any, inputs: Any, reset_fn: Any) -> None:
    if not isinstance(model, nn.Module):
        raise validate.InvalidArgumentType("model", type(model).__name__, "a torch.nn.Module")
    if not isinstance(inputs, torch.Tensor):
        raise validate.InvalidArgumentType("inputs", type(inputs).__name__, "a tensor [B, T, ...]")
    if inputs.dim() < 2 or inputs.shape[0] < 1 or inputs.shape[1] < MIN_STEPS:
        raise validate.InvalidArgument(
            "inputs", inputs.shape, f"a sample batch [B, T, ...] of B >= 1 rows and T >= {MIN_STEPS} steps",
            "the checks cut the sample at steps 1, T/2 and T-1 and compare the pieces with one call: pass a longer "
            "sample (with Trainer(check_model=True), the first train_on call's inputs are the sample)",
        )
    if reset_fn is not None and not callable(reset_fn):
        raise validate.InvalidArgumentType("reset_fn", reset_fn, "a function (state, rows[B] bool) -> state, or None")


@contextlib.contextmanager
def _isolated(model: nn.Module, devices: list[int]) -> Iterator[list[str]]:
    """Eval mode and a forked RNG; afterwards every module's mode and every parameter and buffer
    as they were. Yields a list that receives the names of those that ``forward`` changed."""
    modes = [(m, m.training) for m in model.modules()]
    kept = [(f"{prefix}.{key}" if prefix else key, owner, key, t, t.detach().clone())
            for prefix, owner in model.named_modules()
            for key, t in itertools.chain(owner._parameters.items(), owner._buffers.items()) if t is not None]
    changed: list[str] = []
    try:
        model.eval()
        with torch.random.fork_rng(devices=devices):
            yield changed
    finally:
        for name, owner, key, original, value in kept:
            current = getattr(owner, key, None)
            if current is not original or not same(current, value):
                changed.append(name)
                setattr(owner, key, original)
                with torch.no_grad():
                    original.copy_(value)
        for module, mode in modes:
            module.training = mode


def _weights_check(changed: list[str]) -> Check:
    if not changed:
        return Check("weights and buffers", "unchanged by forward")
    names = ", ".join(changed)
    return Check("weights and buffers", f"changed by forward: {names}", (
        f"forward changed {names} while the model ran in eval mode, with no optimizer: state kept inside the module "
        "is invisible to the engine, which cannot carry it per stream, reset it, cut its graph or save it. Return it "
        "as part of the state instead (the values were restored after the check).",), passed=False)


__all__ = ["check_model", "ModelReport", "ModelContractError", "Check", "MIN_STEPS"]
