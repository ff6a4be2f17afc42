"""The contenders of the benchmark suite: tbptt's Trainer, the hand-written loops it is compared
with, and the least-work bounds, each as an untimed setup that returns the run to time.

Every contender trains the same ``RecurrentNet`` (nn.LSTM + linear head) from the same initial
weights on the same streams with the same optimizer (plain SGD).
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import torch

from ..engine import StreamEngine
from ..schedule import TBPTT, Update
from ..trainer import Trainer
from .workloads import Workload, per_step_mse

Prepared = tuple[Callable[[], None], list[torch.Tensor]]
Job = Callable[[], Prepared]
"""Untimed setup returning the timed run and the parameters it trains."""


def checkpoint_option() -> Optional[str]:
    """The name of the engine's gradient-checkpointing option, if it has one."""
    if "checkpoint_segments" in inspect.signature(StreamEngine.__init__).parameters:
        return "checkpoint_segments"
    return None


def make_trainer(work: Workload, schedule: TBPTT, strategy: str = "recompute", **engine_options: object) -> Trainer:
    model = work.model()
    trainer_params = inspect.signature(Trainer.__init__).parameters
    direct = {k: v for k, v in engine_options.items() if k in trainer_params}
    direct.setdefault("clip_grad_norm", work.clip)
    trainer = Trainer(model, work.loss_fn, work.optimizer(model.parameters()), schedule, strategy, **direct)
    rest = {k: v for k, v in engine_options.items() if k not in trainer_params}
    if rest:  # an option only the engine knows yet
        trainer.engine = StreamEngine(model, work.loss_fn, schedule, strategy, **rest)
    return trainer


def trainer_job(work: Workload, schedule: TBPTT, strategy: str = "recompute", **engine_options: object) -> Job:
    """tbptt.Trainer over the whole stream in one call."""

    def setup() -> Prepared:
        trainer = make_trainer(work, schedule, strategy, **engine_options)
        return (lambda: trainer.train_on(work.inputs, work.targets, end_of_stream=True)), list(trainer.model.parameters())

    return setup


def detach_loop_job(work: Workload, k: Optional[int]) -> Job:
    """The word_language_model loop: chunks of k, carry the state, ``repackage_hidden``, backward,
    clip (where the workload clips), step."""

    def setup() -> Prepared:
        model = work.model()
        model.train()
        optimizer = work.optimizer(model.parameters())
        chunk = work.n if k is None else k

        def run() -> None:
            state = None
            for s in range(0, work.n, chunk):
                outputs, state = model(work.inputs[:, s:s + chunk], state)
                loss = work.loss_fn(outputs, work.targets[:, s:s + chunk]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if work.clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), work.clip)
                optimizer.step()
                state = tuple(h.detach() for h in state)

        return run, list(model.parameters())

    return setup


def cell_recipe_job(work: Workload, k1: int, k2: int) -> Job:
    """The common hand-written TBPTT(k1, k2), k1 < k2: every k1 steps, re-run the last k2 steps
    from the saved state with an LSTMCell, one step at a time, and backpropagate the new errors."""
    if not k1 < k2:
        raise ValueError(f"the LSTMCell recipe re-runs overlapping windows and needs k1 < k2; got {k1}, {k2}")

    def setup() -> Prepared:
        source = work.model()
        cell = torch.nn.LSTMCell(work.n_inputs, work.hidden).to(work.device)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).copy_(getattr(source.rnn, name + "_l0"))
        head = source.head
        params = list(cell.parameters()) + list(head.parameters())
        optimizer = work.optimizer(params)
        n = work.n
        blocks = range(0, n, k1)
        # the window of the block starting at p begins at p + k1 - k2 (clipped at 0)
        starts = {max(0, p + k1 - k2) for p in blocks}

        def run() -> None:
            zeros = work.inputs.new_zeros(work.batch, work.hidden)
            saved = {0: (zeros, zeros)}
            for previous in blocks:
                start, end = max(0, previous + k1 - k2), min(n, previous + k1)
                h, c = saved[start]
                hs = []
                for t in range(start, end):
                    h, c = cell(work.inputs[:, t], (h, c))
                    hs.append(h)
                    if t + 1 > previous and t + 1 in starts:
                        saved[t + 1] = (h.detach(), c.detach())
                outputs = head(torch.stack(hs[previous - start:], dim=1))
                loss = per_step_mse(outputs, work.targets[:, previous:end]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        return run, params

    return setup


def recompute_loop_job(work: Workload, schedule: TBPTT) -> Job:
    """TBPTT(k1, k2) with ``recompute`` written by hand: per update, re-run the window with the
    fused model from the saved state at its start (the call cut where a later window starts inside
    the new block, to save that state), backpropagate the new errors, clip where the workload
    clips, step."""
    updates = schedule.updates(work.n)
    starts = {u.start for u in updates}

    def setup() -> Prepared:
        model = work.model()
        model.train()
        optimizer = work.optimizer(model.parameters())

        def run() -> None:
            saved: dict[int, object] = {0: None}
            previous = 0
            for u in updates:
                state = saved[u.start]
                # a state is saved once: as its step's own block computed it
                cuts = sorted({u.start, u.stop} | {p for p in starts if max(u.start, previous) < p < u.stop})
                pieces = []
                for a, b in zip(cuts[:-1], cuts[1:]):
                    out, state = model(work.inputs[:, a:b], state)
                    pieces.append(out)
                    if b > previous and (b in starts or b == u.stop):
                        saved[b] = tuple(h.detach() for h in state)
                previous = u.stop
                outputs = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
                loss = work.loss_fn(outputs[:, u.loss_start - u.start:], work.targets[:, u.loss_start:u.stop]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if work.clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), work.clip)
                optimizer.step()
                saved = {p: s for p, s in saved.items() if p >= u.stop - (schedule.k2 or u.stop) or p == 0}

        return run, list(model.parameters())

    return setup


def recompute_bound_job(work: Workload, schedule: TBPTT) -> Job:
    """Least work of ``recompute``: per update, one fused call over its window from a constant
    entering state, the head on the injected steps only, one backward, one optimizer step."""

    def setup() -> Prepared:
        model = work.model()
        optimizer = work.optimizer(model.parameters())
        updates = schedule.updates(work.n)

        def run() -> None:
            for u in updates:
                hidden, _ = model.rnn(work.inputs[:, u.start:u.stop])
                outputs = model.head(hidden[:, u.loss_start - u.start:])
                loss = per_step_mse(outputs, work.targets[:, u.loss_start:u.stop]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        return run, list(model.parameters())

    return setup


def stored_bound_job(work: Workload, schedule: TBPTT) -> Job:
    """Least work of ``stored``: each step runs forward once, in the calls of k1 steps the schedule
    forces (the weights change every k1 steps), with its graph and its errors' loss; per update,
    the backward alone through one fused graph as long as its window (built untimed, on a copy of
    the weights, and kept with ``retain_graph``); one optimizer step per update."""

    def setup() -> Prepared:
        model = work.model()
        params = list(model.parameters())
        optimizer = work.optimizer(params)
        updates = schedule.updates(work.n)
        # the windows' graphs live on a copy so that optimizer steps do not invalidate them
        copy = work.model()
        copy_params = list(copy.parameters())
        graphs = {}
        for window, errors in {(u.window, u.errors) for u in updates}:
            hidden, _ = copy.rnn(work.inputs[:, :window])
            outputs = copy.head(hidden[:, window - errors:])
            graphs[window, errors] = per_step_mse(outputs, work.targets[:, window - errors:window]).mean()

        def backward(u: Update) -> tuple[Optional[torch.Tensor], ...]:
            return torch.autograd.grad(graphs[u.window, u.errors], copy_params, retain_graph=True)

        return _forward_once(work, model, optimizer, updates, backward), params

    return setup


def _forward_once(work: Workload, model: torch.nn.Module, optimizer: torch.optim.Optimizer, updates: list[Update],
                  backward: Callable[[Update], Sequence[Optional[torch.Tensor]]]) -> Callable[[], None]:
    """The run of a stored bound: each block forward once with its graph and its errors' loss, the
    state carried detached, then the update's gradient from ``backward`` and one optimizer step."""
    params = list(model.parameters())

    def run() -> None:
        state, previous = None, 0
        for u in updates:
            outputs, state = model(work.inputs[:, previous:u.stop], state)
            per_step_mse(outputs, work.targets[:, previous:u.stop]).mean()
            state = tuple(h.detach() for h in state)
            for p, g in zip(params, backward(u)):
                p.grad = g
            optimizer.step()
            previous = u.stop

    return run


def stored_floor_job(work: Workload, schedule: TBPTT) -> Job:
    """The calls ``stored`` cannot avoid with a fused model: each step forward once in k1-step
    calls, and per update a backward through its window's k1-step graphs, newest first, each
    handing its entering state's gradient to the one before (the weights differ from block to
    block, so a window's steps cannot share one fused graph). The graphs are built untimed, on a
    copy of the weights, and kept with ``retain_graph``; one optimizer step per update. Needs
    k2 a multiple of k1."""
    k1, k2 = schedule.k1, schedule.k2
    if k1 is None or k2 is None or k2 % k1:
        raise ValueError(f"the stored floor needs k2 a multiple of k1; got {schedule}")

    def setup() -> Prepared:
        model = work.model()
        params = list(model.parameters())
        optimizer = work.optimizer(params)
        updates = schedule.updates(work.n)
        copy = work.model()
        copy_params = list(copy.parameters())
        chain, state = [], None  # (entering state leaves, leaving state, the segment's loss)
        for i in range(k2 // k1):
            entering = None if state is None else tuple(h.detach().requires_grad_(True) for h in state)
            outputs, state = copy(work.inputs[:, i * k1:(i + 1) * k1], entering)
            chain.append((entering, state, per_step_mse(outputs, work.targets[:, i * k1:(i + 1) * k1]).mean()))

        def window_backward(segments: int) -> list[Optional[torch.Tensor]]:
            total: list[Optional[torch.Tensor]] = [None] * len(copy_params)
            handed = None
            for index in range(len(chain) - 1, len(chain) - 1 - segments, -1):
                entering, leaving, loss = chain[index]
                inner = entering is not None and index > len(chain) - segments
                wanted = copy_params + (list(entering) if inner else [])
                got = torch.autograd.grad([loss] if handed is None else list(leaving), wanted, handed,
                                          retain_graph=True, allow_unused=True)
                total = [a if b is None else b if a is None else a + b for a, b in zip(total, got)]
                handed = got[len(copy_params):] if inner else None
            return total

        return _forward_once(work, model, optimizer, updates, lambda u: window_backward(u.window // k1)), params

    return setup


def keras_stateful_job(work: Workload, k: int) -> Job:
    """Keras 3 stateful LSTM + Dense trained chunk by chunk with ``train_on_batch`` (TBPTT(k, k) the
    Keras way), same sizes, SGD at the same learning rate. Needs ``keras`` importable; runs on
    whatever backend Keras is configured with (its own weights, initialised by Keras)."""
    import keras  # optional: only called where keras is importable

    def setup() -> Prepared:
        model = keras.Sequential([
            keras.Input(batch_shape=(work.batch, None, work.n_inputs)),
            keras.layers.LSTM(work.hidden, stateful=True, return_sequences=True),
            keras.layers.Dense(work.n_outputs),
        ])
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=work.lr), loss="mse")
        x, y = work.inputs.cpu().numpy(), work.targets.cpu().numpy()

        def run() -> None:
            for layer in model.layers:
                if getattr(layer, "stateful", False):
                    layer.reset_states()
            for s in range(0, work.n, k):
                model.train_on_batch(x[:, s:s + k], y[:, s:s + k])

        return run, []

    return setup
