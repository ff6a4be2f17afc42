"""The checks of the state: each row a stream of its own, each leaf's batch dim found by experiment
(and where resets look for it), the gradient reaching the carried state, and the state passed in
neither returned as it was nor changed in place.

A leaf's batch dim is the dim of size B whose size follows the rows when the sample is cut to a
sub-batch; a dim whose size follows the steps (after one step, after T) is time, not batch.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
from torch.utils import _pytree as pytree

from .. import state as st
from .report import Check
from .runner import Run, Runner, diff, floating, fresh, gap, leaves, same, shape_problem


class Layout(NamedTuple):
    """A state leaf after the sample, after a sub-batch of its rows and after one step."""

    path: str
    leaf: Any
    sub: Any
    one: Any
    batch_dims: list[int]  # dims of size B whose size follows the rows (fewer in the sub-batch)
    time_dims: list[int]  # dims whose size follows the steps (after 1 step, after T)


def _changed(full: Any, other: Any, size: Optional[int] = None, to: Optional[int] = None) -> list[int]:
    """Dims whose size differs between two tensors (from ``size`` to ``to`` when given)."""
    if not (isinstance(full, torch.Tensor) and isinstance(other, torch.Tensor)) or full.dim() != other.dim():
        return []
    return [d for d, (m, n) in enumerate(zip(full.shape, other.shape))
            if m != n and (size is None or (m, n) == (size, to))]


def _rows_of(state: Any, rows: list[int], batch: int) -> Any:
    """The state of ``rows`` only, cut along each leaf's batch dim as ``tbptt.state.batch_dim`` reads it."""
    index = torch.tensor(rows)
    return st.map_tensors(lambda t: t.index_select(st.batch_dim(t, batch), index.to(t.device)), state)


def layout(run: Runner, full: Run) -> tuple[Optional[Run], list[Layout]]:
    """Run a sub-batch (None with one row) and one step; find each leaf's batch and time dims from the shapes."""
    sub: Optional[Run] = None
    if run.rows:
        try:
            start = _rows_of(fresh(run.start), run.rows, run.batch)
            sub = run.call(run.x[run.rows], start, f"a sub-batch of rows {run.rows}")
        except ValueError as error:
            sub = Run(error=f"could not be given the state of rows {run.rows} ({error})")
    one = run.call(run.x[:, :1], fresh(run.start), "one step")
    subs = dict(leaves(sub.state)) if sub is not None and not sub.error else {}
    ones = dict(leaves(one.state)) if not one.error else {}
    found = []
    for path, leaf in leaves(full.state):
        s, o = subs.get(path), ones.get(path)
        found.append(Layout(path, leaf, s, o, _changed(leaf, s, run.batch, len(run.rows)), _changed(leaf, o)))
    return sub, found


_TIME_FIRST = ("the module reads dim 0 of the inputs as time and dim 1 as the batch, as an nn.GRU/LSTM/RNN built "
               "without batch_first=True does; build it with nn.GRU(..., batch_first=True).")


def time_first_hint(found: list[Layout]) -> str:
    """What explains failures elsewhere when a state leaf follows the steps and not the rows."""
    if any(f.time_dims and not f.batch_dims for f in found):
        return f" The state follows the number of steps, not of rows (see the state check): {_TIME_FIRST}"
    return ""


def check_batch(run: Runner, full: Run, sub: Optional[Run], found: list[Layout]) -> Check:
    """A row's outputs and state are the same when it runs with fewer other rows."""
    name, rows = "batch independence", run.rows
    if sub is None:
        return Check(name, "not run: one row (a sample of 2 rows or more checks this)", passed=None)
    problem = sub.error or shape_problem(sub.outputs, len(rows), run.steps)
    if problem:
        return Check(name, f"rows {rows} alone: failed", (
            f"batch independence: the model {problem} on a sub-batch of rows {rows} of the sample; a model must run "
            "any number of rows, each row a stream of its own.",), passed=False)
    tol = run.tol(full.outputs)
    d = diff(sub.outputs, full.outputs[rows]).reshape(len(rows), run.steps, -1)
    worst = float(d.max()) if d.numel() else 0.0
    state_gaps = [gap(f.sub, f.leaf.index_select(f.batch_dims[0], torch.tensor(rows, device=f.leaf.device)))
                  for f in found if len(f.batch_dims) == 1 and not f.time_dims]
    measured = f"rows {rows} alone: outputs max |Δ| {worst:.2g}" + (
        f", state max |Δ| {max(state_gaps):.2g}" if state_gaps else "") + f" (tolerance {tol:.2g})"
    if worst <= tol:
        return Check(name, measured)
    i = int(d.amax(dim=(1, 2)).gt(tol).nonzero()[0])
    step = int(d[i].amax(dim=-1).gt(tol).nonzero()[0])
    hint = time_first_hint(found) or (
        " Likely: statistics over the batch (a mean or norm over dim 0, BatchNorm), or batch and time swapped (an "
        "nn.GRU/LSTM/RNN without batch_first=True: build it with batch_first=True). Compute each row from that row "
        "alone.")
    return Check(name, measured, (
        f"batch independence: row {rows[i]}'s outputs change when it runs with rows {rows} only (first at step "
        f"{step}, |Δ| {float(d[i, step].max()):.2g}, tolerance {tol:.2g}): a row's outputs depend on the other "
        f"rows, so the B streams are not independent.{hint}",), passed=False)


def check_state(run: Runner, full: Run, found: list[Layout]) -> Check:
    """Each leaf: a tensor, its batch dim found by experiment, and resets that find it."""
    if not found:
        return Check("state", "None: the model keeps no state between calls")
    described, problems, notes = [], [], []
    for f in found:
        text, problem, note = _leaf(run, f)
        described.append(text)
        problems += [problem] if problem else []
        notes += [note] if note else []
    problems += _reset_problems(run, full.state, found)
    return Check("state", "; ".join(described), tuple(problems), tuple(notes), passed=not problems)


def _leaf(run: Runner, f: Layout) -> tuple[str, str, str]:
    """(description, problem, note) of one state leaf."""
    path, leaf = f.path, f.leaf
    if isinstance(leaf, (bool, int, float)):
        return f"{path} = {leaf!r}", (
            f"{path} is a Python {type(leaf).__name__} ({leaf!r}): one value for all rows, which the engine can "
            "neither reset per row nor carry a gradient through; hold it in a tensor with a batch dim [B, ...]."), ""
    shape, dtype = tuple(leaf.shape), str(leaf.dtype).replace("torch.", "")
    about = f"{path} {shape} {dtype}"
    note = "" if floating(leaf) else (
        f"{path} is {dtype}: the engine detaches, resets (to 0) and saves it, but no gradient flows through it.")
    if f.time_dims:
        d = f.time_dims[0]
        one = f.one.shape[d]
        if not f.batch_dims:
            return f"{about}: dim {d} follows the steps", (
                f"{path} {shape}: dim {d} follows the number of steps ({shape[d]} after {run.steps} steps, {one} after "
                f"1){_no_row_dim(run, f)}: {_TIME_FIRST}"), note
        return f"{about}: dim {d} grows", (
            f"{path} {shape}: dim {d} grows with the steps seen ({one} after 1 step, {shape[d]} after {run.steps}): "
            "the engine needs a state whose shape stays the same from call to call (keep a fixed number of past "
            "steps)."), note
    if f.sub is None:
        return f"{about}: batch dim {'not checked (one row)' if not run.rows else 'not found (no sub-batch)'}", "", note
    if len(f.batch_dims) != 1:
        return f"{about}: batch dim not found", _no_batch_dim(run, f), note
    d = f.batch_dims[0]
    if run.reset_fn not in (None, st.reset_rows):
        return f"{about}: batch dim {d}", "", note
    try:
        engine: Optional[int] = st.batch_dim(leaf, run.batch)
    except ValueError:
        engine = None
    if engine == d:
        return f"{about}: batch dim {d} (= tbptt.state.batch_dim)", "", note
    reads = f"dim {engine}" if engine is not None else "no dim"
    return f"{about}: batch dim {d} (tbptt.state.batch_dim: {reads})", (
        f"{path} {shape}: the batch is dim {d} (its size follows the rows of a sub-batch), but tbptt.state.batch_dim, "
        f"which resets use, reads {reads} as the batch: resets (where a sequence starts in a row: masks, packed "
        "streams) would clear the wrong entries. Keep the state batch first [B, ...] (a 3-D leaf with size B in dim 1 "
        f"is read as nn.GRU's [layers, B, H]), or give the Trainer a reset_fn that resets dim {d}."), note


def _no_row_dim(run: Runner, f: Layout) -> str:
    if f.sub is None:
        return ""
    return f" and no dim follows the rows (the same shape for a sub-batch of {len(run.rows)})"


def _no_batch_dim(run: Runner, f: Layout) -> str:
    shape, sub = tuple(f.leaf.shape), tuple(f.sub.shape) if isinstance(f.sub, torch.Tensor) else f.sub
    rows = len(run.rows)
    if f.batch_dims:
        return (f"{f.path} {shape}: dims {f.batch_dims} all follow the rows; the engine resets and checks rows along "
                "one batch dim per leaf: keep one entry per row along a single dim.")
    if sub == shape:
        return (f"{f.path} {shape} has no batch dim: its shape is the same for {run.batch} rows and for a sub-batch "
                f"of {rows}, so one value is shared by all rows (the streams mix and cannot be reset one by one); "
                "give it one entry per row, batch first [B, ...].")
    return (f"{f.path}: its shape {shape} for {run.batch} rows becomes {sub} for {rows}, but no dim has one entry per "
            "row; the engine resets rows along one dim of size B: keep the rows in a dim of their own [B, ...].")


def _reset_problems(run: Runner, state: Any, found: list[Layout]) -> list[str]:
    """With a ``reset_fn`` of the user's: resetting row 0 changes row 0 and keeps the other rows."""
    if run.reset_fn in (None, st.reset_rows):
        return []
    rows = torch.zeros(run.batch, dtype=torch.bool, device=run.x.device)
    rows[0] = True
    try:
        after = dict(leaves(run.reset_fn(fresh(state), rows)))
    except Exception as error:  # the user's function failing is what is reported
        return [f"reset_fn(state, rows) raised {type(error).__name__} ({error}) on the state after the sample, row 0 reset."]
    problems = []
    for f in found:
        new = after.get(f.path)
        if len(f.batch_dims) != 1 or f.time_dims or not isinstance(f.leaf, torch.Tensor):
            continue
        d = f.batch_dims[0]
        others = torch.arange(1, run.batch, device=f.leaf.device)
        if not isinstance(new, torch.Tensor) or new.shape != f.leaf.shape:
            problems.append(f"reset_fn changed {f.path} from {tuple(f.leaf.shape)} to {_about(new)}; a reset keeps the shape.")
        elif not same(new.index_select(d, others), f.leaf.index_select(d, others)):
            problems.append(f"reset_fn, asked to reset row 0, changed other rows of {f.path} (its batch is dim {d}): "
                            f"it must reset only the rows flagged, along dim {d}.")
        elif same(new.select(d, 0), f.leaf.select(d, 0)) and bool(f.leaf.select(d, 0).ne(0).any()):
            problems.append(f"reset_fn, asked to reset row 0, left row 0 of {f.path} (dim {d}) as it was.")
    return problems


def _about(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def check_gradient(run: Runner, full: Run, consistent: bool) -> Check:
    """The second piece's outputs and state depend, through autograd, on the state the first returned."""
    name, cut = "gradient to the state", run.steps // 2
    x1 = run.x[:, :cut].detach().requires_grad_(True) if floating(run.x) else run.x[:, :cut]
    if not x1.requires_grad and not any(p.requires_grad for p in run.model.parameters()):
        return Check(name, "not run: neither the inputs nor any parameter can carry a gradient", passed=None)
    with torch.enable_grad():
        first = run.call(x1, fresh(run.start), f"the piece [0, {cut}) of the gradient check")
        second = run.call(run.x[:, cut:], first.state, f"the piece [{cut}, {run.steps}) of the gradient check") \
            if not first.error else first
        if second.error:
            return Check(name, "not run: the pieces did not run (see the cuts)", passed=None)
        carried = [(p, leaf) for p, leaf in leaves(first.state) if floating(leaf)]
        if not carried:
            return Check(name, "no floating state: no gradient to carry")
        wanted = [(p, leaf) for p, leaf in carried if leaf.requires_grad]
        target = _projection(run, second)
        try:
            grads = torch.autograd.grad(target, [leaf for _, leaf in wanted], allow_unused=True) \
                if wanted and target.requires_grad else [None] * len(wanted)
        except RuntimeError as error:
            return Check(name, "backward failed", (
                f"the gradient of the second piece [{cut}, {run.steps}) with respect to the state the first returned "
                f"could not be computed: {error}",), passed=False)
    sizes = {p: 0.0 if g is None else float(g.abs().max()) for (p, _), g in zip(wanted, grads)}
    reference = dict(leaves(full.state))
    problems, notes = [], []
    for path, leaf in carried:
        if not leaf.requires_grad:
            problem, note = _cut_loose(run, path, leaf, reference.get(path), cut)
        elif sizes[path] == 0:
            problem, note = _unreached(run, path, first.state, second, cut, consistent)
        else:
            continue
        problems += [problem] if problem else []
        notes += [note] if note else []
    measured = "largest |∂ second piece / ∂ leaf|: " + ", ".join(
        f"{p} {sizes[p]:.2g}" if p in sizes else f"{p} none (no graph)" for p, _ in carried)
    return Check(name, measured, tuple(problems), tuple(notes), passed=not problems)


def _projection(run: Runner, result: Run) -> torch.Tensor:
    """A random weighted sum of a run's outputs and floating state leaves (one backward reaches all)."""
    total = torch.zeros((), dtype=torch.float64, device=run.x.device)
    for t in [result.outputs, *[leaf for _, leaf in leaves(result.state)]]:
        if floating(t) and t.requires_grad:
            real = torch.view_as_real(t) if t.is_complex() else t
            total = total + (real * run.random_like(real)).sum().to(total.dtype)
    return total


def _cut_loose(run: Runner, path: str, leaf: torch.Tensor, reference: Any, cut: int) -> tuple[str, str]:
    """A leaf that comes out of forward with no graph: detached, or a constant."""
    if isinstance(reference, torch.Tensor) and gap(leaf, reference) > run.tol(reference):
        return (f"{path} comes out of forward cut from the graph (no gradient history after [0, {cut}), though its "
                f"value depends on the inputs: it differs after {cut} and after {run.steps} steps): gradients cannot "
                "flow back through the state into earlier calls, so no window reaches across a call. Do not .detach() "
                "the state in forward; the engine cuts the graph where the schedule says."), ""
    return "", f"{path} is the same after {cut} and after {run.steps} steps and has no gradient: a constant."


def _unreached(run: Runner, path: str, state: Any, second: Run, cut: int, consistent: bool) -> tuple[str, str]:
    """A leaf no gradient reaches: used by value but detached in forward, or ignored."""
    moved = _response(run, path, state, second, cut)
    if moved > run.tol(second.outputs):
        return (f"{path}, returned by the piece [0, {cut}), changes the outputs or state of the next piece when it "
                f"changes (|Δ| {moved:.2g}) but no gradient reaches it through autograd: forward detaches the state it "
                "is given (or passes it through a non-differentiable op). Do not .detach() the state in forward: the "
                "engine cuts the graph where the schedule says, and windows longer than a call need the gradient "
                "through it."), ""
    ignored = f"{path} is ignored: the next piece's outputs and state neither change with it nor have a gradient to it"
    if consistent:
        return "", (f"{ignored}; the pieces agree with one call, so the outputs need no history across calls and "
                    "the model keeps none (how TBPTT truncates makes no difference to it).")
    return (f"{ignored}, and the pieces differ from one call (see the cuts): forward must continue from the state it "
            "is given."), ""


def _response(run: Runner, path: str, state: Any, reference: Run, cut: int) -> float:
    """How much the next piece's outputs and state move when the leaf at ``path`` is perturbed."""
    flat, spec = pytree.tree_flatten_with_path(state)
    values = []
    for key, leaf in flat:
        if isinstance(leaf, torch.Tensor):
            leaf = leaf.detach()
            if "state" + pytree.keystr(key) == path:
                leaf = leaf + (1.0 + float(leaf.abs().max())) * run.random_like(leaf)
        values.append(leaf)
    with torch.no_grad():
        moved = run.call(run.x[:, cut:], pytree.tree_unflatten(values, spec), f"the piece [{cut}, {run.steps}) from a changed state")
    if moved.error:
        return math.inf
    return max([gap(moved.outputs, reference.outputs),
                *[g for g, _ in run.state_gaps(moved.state, reference.state).values()]])


def check_handling(run: Runner) -> Check:
    name = "state passed in"
    if not run.given_calls:
        return Check(name, "never given a state (the model returns none)")
    if not run.handling:
        return Check(name, f"a new state returned, the one given unchanged ({run.given_calls} calls)")
    return Check(name, f"returned or changed in place ({run.given_calls} calls)", tuple(run.handling.values()),
                 passed=False)
