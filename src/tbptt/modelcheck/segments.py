"""The checks of a call: it runs, its outputs are ``[B, T, ...]`` and finite, it is deterministic,
and the sample cut into pieces with the state carried gives what one call gives.

A difference before the first cut means the model looks ahead (the first piece saw fewer later
steps); one from a cut on, gone a few steps later, means the state misses that many steps of
history (a causal convolution zero-padded on every call); one that lasts means it misses more.
"""

from __future__ import annotations

import torch

from .report import Check
from .runner import (
    Run,
    Runner,
    diff,
    floating,
    fresh,
    gap,
    leaves,
    shape_problem,
    splits,
)


def check_call(run: Runner, full: Run) -> list[Check]:
    start = "state=None (how every stream starts)" if run.start is None else "the given state"
    if full.error:
        fix = " Create the initial state inside forward when state is None." if run.start is None else ""
        return [Check("call", f"failed from {start}", (
            f"the model {full.error} on the sample {tuple(run.x.shape)} from {start}.{fix}",), passed=False)]
    opaque = [(path, leaf) for path, leaf in leaves(full.state) if not isinstance(leaf, (torch.Tensor, bool, int, float))]
    if opaque:
        path, leaf = opaque[0]
        return [Check("call", "returns a state the engine cannot handle", (
            f"{path} is a {type(leaf).__name__}, which the engine cannot see into to detach, reset or save; make the "
            "state tensors in tuples, lists or dicts (or register the class with torch.utils._pytree).",), passed=False)]
    checks = [Check("call", f"returns (outputs, state) from {start}")]
    if run.start is not None:
        fresh_stream = run.call(run.x[:, :1], None, "a fresh stream")
        if fresh_stream.error:
            checks.append(Check("call from None", "failed", (
                f"the model {fresh_stream.error} on one step from state=None, how the Trainer starts every stream "
                "(and again after reset_state()); create the initial state inside forward when state is None.",),
                passed=False))
    problem = shape_problem(full.outputs, run.batch, run.steps)
    if problem:
        return [*checks, Check("output shape", "wrong", (f"the model {problem}.",), passed=False)]
    return [*checks, Check("output shape", f"{tuple(full.outputs.shape)} = [B, T, ...]"), check_finite(run, full)]


def check_finite(run: Runner, full: Run) -> Check:
    problems = []
    for path, value in [("the outputs", full.outputs), *leaves(full.state)]:
        if floating(value) and not bool(torch.isfinite(value).all()):
            bad = ~torch.isfinite(value.detach())
            where = ""
            if value is full.outputs:
                row, step = bad.reshape(run.batch, run.steps, -1).any(-1).nonzero()[0].tolist()
                where = f", first at row {row}, step {step}"
            problems.append(f"{path} after the sample {'are' if value is full.outputs else 'is'} not finite "
                            f"({int(bad.sum())} of {value.numel()} values{where}); check that the sample and the "
                            "weights are finite: the other checks compare runs and need finite values.")
    return Check("finite", "not finite" if problems else "outputs and state finite", tuple(problems),
                 passed=not problems)


def check_repeat(run: Runner, full: Run) -> Check:
    again = run.call(run.x, fresh(run.start), "a second identical call")
    tol = run.tol(full.outputs)
    output_gap = gap(again.outputs, full.outputs)
    state_bad = [p for p, (g, t) in run.state_gaps(again.state, full.state).items() if g > t]
    measured = f"two identical calls: outputs max |Δ| {output_gap:.2g} (tolerance {tol:.2g})"
    if not again.error and output_gap <= tol and not state_bad:
        return Check("determinism", measured)
    parts = [f"other outputs (max |Δ| {output_gap:.2g}, tolerance {tol:.2g})"] if output_gap > tol else []
    parts += [f"another state (at {', '.join(state_bad)})"] if state_bad else []
    what = f"{again.error} on" if again.error else f"gives {' and '.join(parts)} on"
    return Check("determinism", measured, (
        f"the model {what} a second identical call in eval mode: forward draws random numbers (noise, or a dropout "
        "that eval() does not turn off, such as F.dropout(x, training=True)) or keeps something between calls; make "
        "eval-mode forward a function of its inputs and state.",), passed=False)


def check_splits(run: Runner, full: Run, hint: str = "") -> list[Check]:
    """One check per way of cutting the sample; each kind of failure is explained once, where it
    is clearest (the middle cut comes first), and the other cuts that show it are named. ``hint``
    ends each problem (what other checks found that explains it)."""
    results = [(name, *_split(run, full, cuts, name)) for name, cuts in splits(run.steps)]
    first: dict[str, str] = {}
    for name, _, kind, _ in results:
        if kind:
            first.setdefault(kind, name)
    checks = []
    for name, measured, kind, text in results:
        if not kind:
            checks.append(Check(name, measured))
        elif first[kind] == name:
            others = [n for n, _, k, _ in results if k == kind and n != name]
            also = f" (Also at: {', '.join(others)}.)" if others else ""
            checks.append(Check(name, measured, (text + also + hint,), passed=False))
        else:
            checks.append(Check(name, f"{measured} (as at {first[kind]})", passed=False))
    return checks


def _split(run: Runner, full: Run, cuts: list[int], name: str) -> tuple[str, str, str]:
    """Run the pieces between ``cuts`` with the state carried: (measured, kind of failure, problem)."""
    bounds = [0, *cuts, run.steps]
    outputs, state = [], fresh(run.start)
    for a, b in zip(bounds, bounds[1:]):
        piece = run.call(run.x[:, a:b], state, f"{name}, the piece [{a}, {b})")
        problem = piece.error or shape_problem(piece.outputs, run.batch, b - a)
        if problem:
            given = "the state the piece before returned" if a else "the starting state"
            return f"the piece [{a}, {b}) failed", "failed", (
                f"{name}: the model {problem} on the piece [{a}, {b}) from {given}. A model must continue from the "
                "state it returned, over pieces of any length (one step included).")
        outputs.append(piece.outputs)
        state = piece.state
    return _compare(run, full, torch.cat(outputs, dim=1), state, cuts, name)


def _compare(run: Runner, full: Run, pieces: torch.Tensor, state, cuts: list[int], name: str) -> tuple[str, str, str]:
    tol = run.tol(full.outputs)
    steps = diff(pieces, full.outputs).reshape(run.batch, run.steps, -1)
    output_gap = float(steps.max()) if steps.numel() else 0.0
    states = run.state_gaps(state, full.state)
    measured = f"outputs max |Δ| {output_gap:.2g}"
    if states:
        measured += f", final state max |Δ| {max(g for g, _ in states.values()):.2g}"
    measured += f" (tolerance {tol:.2g})"
    if output_gap > tol:
        return (measured, *_diagnose(run, steps, tol, cuts, name))
    for path, (g, t) in states.items():
        if g > t:
            shapes = dict(leaves(state)).get(path), dict(leaves(full.state)).get(path)
            size = "" if g != float("inf") else f", {_shape(shapes[0])} after the pieces, {_shape(shapes[1])} after one call"
            return measured, "final state", (
                f"{name}: the outputs agree (max |Δ| {output_gap:.2g}) but the final state differs at {path} (|Δ| "
                f"{g:.2g}, tolerance {t:.2g}{size}): the state returned after the pieces is not the one returned after "
                "one call; return the state at the last step of the call (not of an earlier or a padded step).")
    return measured, "", ""


def _shape(leaf) -> str:
    return str(tuple(leaf.shape)) if isinstance(leaf, torch.Tensor) else repr(leaf)


def _diagnose(run: Runner, d: torch.Tensor, tol: float, cuts: list[int], name: str) -> tuple[str, str]:
    """Which kind of failure the first differing step shows, and the problem's text."""
    steps = d.amax(dim=(0, 2))
    bad = (steps > tol).nonzero().flatten().tolist()
    t0 = bad[0]
    row = int(d[:, t0].amax(dim=-1).argmax())
    at = f"the outputs first differ at step {t0}, row {row} (|Δ| {float(steps[t0]):.2g}, tolerance {tol:.2g})"
    if t0 < cuts[0]:
        return "looks ahead", (
            f"{name}: {at}, before the cut at {cuts[0]}: the first piece saw fewer later steps than one call did, so "
            "the output at a step depends on later inputs: the model looks ahead (it is not causal: a bidirectional "
            "layer, a reversed scan or cumsum, a convolution padded on both sides, attention without a causal mask). "
            "Make each step's output depend only on the steps up to it.")
    cut = max(c for c in cuts if c <= t0)
    end = min([c for c in cuts if c > cut] + [run.steps])
    last = max(t for t in bad if t < end)
    where = f"right after the cut at {cut}" if t0 == cut else f"{t0 - cut} steps after the cut at {cut}"
    if last < end - 1 and float(steps[last]) > 10 * tol:
        k = last - cut + 1
        return "misses history", (
            f"{name}: {at}, {where}, and agree again from step {last + 1} on: the state carried across the cut misses "
            f"the last {k} step{'s' * (k != 1)} of history, as a causal convolution of width {k + 1} zero-padded on "
            f"every call does. Carry the last conv_width - 1 inputs in the state (here {k}) and put them before the "
            "new inputs instead of the zero padding.")
    tail = (f"still differ at step {end - 1} (|Δ| {float(steps[end - 1]):.2g})" if last == end - 1 else
            f"the difference dies away slowly (|Δ| {float(steps[last]):.2g} at step {last})")
    return "misses history", (
        f"{name}: {at}, {where}, and {tail}: the state carried across the cut does not hold all the history the "
        "outputs depend on (the given state ignored or replaced by zeros, part of the memory not returned, a "
        "convolution's history not carried). Return from forward everything it needs to continue, and continue from "
        "the state it is given.")
