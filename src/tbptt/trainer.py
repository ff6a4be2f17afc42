"""The trainer: applies each TBPTT update of the engine with an optimizer.

``train_on`` continues one stream per batch row across calls; every update is checked for a finite
loss and gradient before it reaches the weights.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Literal, Optional

import torch
from torch import nn

from . import checkpoint
from . import state as st
from .checkpointing import Segments
from .contract import LossFn
from .engine import ResetFn, Strategy, StreamEngine, UpdateResult
from .fit import FitLoop, FitOptions, evaluate
from .modelcheck import ModelContractError
from .modelcheck import check_model as check_contract
from .records import History, NonFiniteError, UpdateRecord
from .schedules import Schedule
from .validate import one_of, positive_number

NonFinite = Literal["skip", "raise"]
_CHECKED_STEPS = 512  # steps of the first segment that check_model=True runs the checks on


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together (0 if there are none)."""
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: one fused (foreach) pass
        return torch.nn.utils.get_total_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


class Trainer:
    """Trains ``model`` with TBPTT(k1, k2) on streams fed in consecutive calls (or with
    ``ARTBP(k1, mean_k2)``, random windows compensated to be unbiased, or ``AdaptiveTBPTT(k1, ...)``,
    k2 chosen from the measured gradient decay; see ``docs/SEMANTICS.md``).

    - ``model(inputs[B, T, ...], state) -> (outputs[B, T, ...], new_state)``, state None at a
      stream's start; any nesting of tensors as state.
    - ``loss_fn(outputs, targets) -> [B, T]`` per-step losses.
    - ``strategy``: ``"recompute"`` (exact gradient at the current weights) or ``"stored"``
      (Williams & Peng: activations kept as first computed); identical when k1 >= k2.
    - ``clip_grad_norm``: clip each update's gradient to this 2-norm.
    - ``nonfinite``: ``"skip"`` an update whose loss or gradient is not finite (it is recorded
      with ``skipped=True``), or ``"raise"`` a ``NonFiniteError`` naming the stream step. Either
      way the weights never see it.
    - ``reset_fn(state, rows)``: how a row's state is reset where a sequence starts (default:
      zeros, for any nesting; nn.RNN/GRU/LSTM states handled by their batch dimension 1).
    - ``checkpoint_segments``: cut each recomputed window into this many segments (or
      ``"sqrt"``) whose activations are recomputed in backward: memory for time (Gruslys et al.
      2016), the same gradient.
    - ``check_model``: before the first update, run ``tbptt.check_model`` on the first
      ``train_on`` call's inputs (T >= 8 steps; its first 512 steps at most, from state None,
      with this trainer's ``reset_fn``) and raise ``ModelContractError``, with its report, if the
      model breaks the engine's contract. Runs once; the weights are untouched until it passes.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        strategy: Strategy = "recompute",
        clip_grad_norm: Optional[float] = None,
        nonfinite: NonFinite = "skip",
        reset_fn: Optional[ResetFn] = None,
        checkpoint_segments: Segments = None,
        *,
        check_model: bool = False,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        positive_number(clip_grad_norm, "clip_grad_norm", none="no clipping")
        one_of(nonfinite, "nonfinite", ("skip", "raise"))
        one_of(check_model, "check_model", (False, True))
        self.engine = StreamEngine(model, loss_fn, schedule, strategy, reset_fn, checkpoint_segments)
        self._check_pending = bool(check_model)
        self.model = model
        self.optimizer = optimizer
        self.clip_grad_norm = clip_grad_norm
        self.nonfinite = nonfinite
        self.updates_applied = 0
        self.updates_skipped = 0

    @property
    def schedule(self) -> Schedule:
        return self.engine.schedule

    @property
    def strategy(self) -> str:
        return self.engine.strategy

    @property
    def position(self) -> int:
        """Steps of the current streams received so far."""
        return self.engine.position

    @property
    def state(self) -> st.State:
        """The streams' state at the last update (detached); None before the first."""
        return self.engine.state

    def train_on(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        end_of_stream: bool = False,
        resets: Optional[torch.Tensor] = None,
    ) -> list[UpdateRecord]:
        """Continue the B streams with ``inputs[B, T, ...]`` and ``targets``; one record per update.

        Updates fall at every k1-th step of the stream however it is cut into calls, and windows
        reach back across calls. Steps after the last update are held until their block closes.
        ``mask[B, T]`` marks valid steps: masked steps inject no error and no gradient, and an
        update's loss is the mean over its valid steps. ``resets[B, T]`` marks where a new sequence
        starts in a row (its state is reset there; no gradient crosses). ``end_of_stream=True``
        ends the streams after this data, as ``reset_state()`` does.

        The model is put in training mode. Padding under a mask may hold anything in the targets;
        the inputs of padded steps must be finite, since other rows' gradients pass through them.
        With ``nonfinite="raise"``, the ``NonFiniteError`` carries the records of the updates this
        call applied before it (``error.records``); the streams stay open where they stood.
        """
        if self._check_pending:
            # a sample of the first segment: long enough for every check, without holding a graph
            # over a whole split when the first segment is one
            report = check_contract(self.model, inputs[:, :_CHECKED_STEPS], reset_fn=self.engine.reset_fn)
            if not report.ok:
                raise ModelContractError(report)
            self._check_pending = False
        self.model.train()
        records: list[UpdateRecord] = []
        started = time.perf_counter()
        try:
            for result in self.engine.feed(inputs, targets, mask, end_of_stream, resets):
                records.append(self._apply(result, started))
                started = time.perf_counter()
        except NonFiniteError as error:
            error.records = records
            raise
        return records

    def state_dict(self) -> dict:
        """Everything needed to continue training where it stands: the model, the optimizer, the
        streams (position, carried states, the open block) and the update counters."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "engine": self.engine.state_dict(),
            "trainer": {"updates_applied": self.updates_applied, "updates_skipped": self.updates_skipped},
        }

    def load_state_dict(self, saved: dict) -> None:
        """Continue from ``state_dict()``: the same schedule and strategy are required."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.engine.load_state_dict(saved["engine"])
        self.updates_applied = saved["trainer"]["updates_applied"]
        self.updates_skipped = saved["trainer"]["updates_skipped"]

    def fit(self, train: Any, epochs: int = 1, valid: Any = None, **options: Any) -> History:
        """Train for ``epochs`` passes over ``train`` (a ``tbptt.data.Split`` or a tuple
        ``(inputs, targets[, mask[, resets]])``); each epoch streams it from fresh states.

        Options: ``segment_length`` (steps per ``train_on`` call; default the whole split),
        ``metric(outputs, targets, mask) -> float`` (reported on ``valid``), ``scheduler`` and
        ``scheduler_interval`` ("epoch" or "update"; ReduceLROnPlateau gets the validation loss),
        ``callbacks`` (objects with ``on_update(trainer, record)`` and/or
        ``on_epoch_end(trainer, info) -> stop?``), ``patience`` (early stopping on validation
        loss) and ``restore_best``, ``checkpoint`` (path) with ``checkpoint_every`` (updates) and
        ``resume``, ``log`` (``.jsonl``/``.csv``), ``progress`` (None: a bar only on a terminal),
        ``max_seconds``. Returns the ``History``.
        """
        return FitLoop(self, train, valid, FitOptions(epochs=epochs, **options)).run()

    def evaluate(self, data: Any, metric: Optional[Callable] = None, segment_length: Optional[int] = None) -> dict:
        """Loss and metric on a split from fresh states, without gradient; training streams untouched."""
        return evaluate(self, data, metric, segment_length)

    def agree_to_stop(self, stop: bool) -> bool:
        """Whether training stops, given this process's wish; data-parallel training overrides it so
        that every rank stops if any does (at the same update)."""
        return stop

    def save_checkpoint(self, payload: dict, path: Any) -> None:
        """Write ``fit``'s checkpoint (atomically; see ``tbptt.checkpoint``)."""
        checkpoint.save(payload, path)

    def load_checkpoint(self, path: Any) -> dict:
        """Read a checkpoint written by ``save_checkpoint``."""
        return checkpoint.load(path)

    def reset_state(self, flush: bool = True) -> list[UpdateRecord]:
        """End the streams; the next ``train_on`` starts fresh streams (state None).

        A block still open is, with ``flush=True`` (default), cut short at the last step received
        and its update applied, as ``SEMANTICS.md`` says of a stream that ends between updates;
        with ``flush=False`` its steps are dropped without an update.
        """
        records: list[UpdateRecord] = []
        if flush:
            started = time.perf_counter()
            for result in self.engine.finish():
                records.append(self._apply(result, started))
        self.engine.reset()
        return records

    def reduce(self, result: UpdateResult) -> UpdateResult:
        """Combine an update's gradient with other processes' before it is checked and applied.

        The identity here; data-parallel training overrides it to average the update across ranks
        (once per update, whatever the strategy's backward passes were).
        """
        return result

    def _apply(self, result: UpdateResult, started: float) -> UpdateRecord:
        record = apply_update(self.reduce(result), self.engine.named_parameters(), self.optimizer,
                              self.clip_grad_norm, self.nonfinite, started)
        if record.skipped:
            self.updates_skipped += 1
        else:
            self.updates_applied += 1
        return record


def apply_update(
    result: UpdateResult,
    named: list[tuple[str, nn.Parameter]],
    optimizer: Any,
    clip_grad_norm: Optional[float],
    nonfinite: NonFinite,
    started: float,
) -> UpdateRecord:
    """Apply one update's gradient to the parameters ``named`` with one ``optimizer.step()``, or
    skip it: the record says which and why (a non-finite loss or gradient, no valid step).

    The gradient is clipped to ``clip_grad_norm`` first; ``nonfinite="raise"`` raises a
    ``NonFiniteError`` instead of skipping a non-finite update. ``optimizer`` is anything with
    ``step()`` and ``zero_grad()`` over those parameters (a torch optimizer, or a wrapper that owns
    the step, such as Lightning's). ``started``: the ``time.perf_counter()`` at which the update's
    work began, for the record's wall time. ``Trainer`` applies every update with it.
    """
    grads = [result.grads[n] for n, _ in named if result.grads[n] is not None]
    norm = total_norm(grads).to(result.loss.device)
    loss_value, norm_value, valid = torch.stack(
        [result.loss.float(), norm.float(), result.valid_steps.float().to(result.loss.device)]
    ).tolist()
    u = result.update
    reason = ""
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        reason = f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient'}"
        if nonfinite == "raise":
            raise NonFiniteError(
                f"{reason} at stream step {u.stop} (window [{u.start}, {u.stop})): loss "
                f"{loss_value}, gradient norm {norm_value}; the weights were not changed"
            )
    elif valid == 0:
        reason = "no valid steps"
    if reason:
        return UpdateRecord(u.start, u.loss_start, u.stop, loss_value, norm_value,
                            time.perf_counter() - started, True, reason, result.k2)
    scale = 1.0
    if clip_grad_norm is not None:
        scale = min(1.0, clip_grad_norm / (norm_value + 1e-6))
    for name, p in named:
        g = result.grads[name]
        p.grad = None if g is None else (g if scale == 1.0 else g * scale).to(p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return UpdateRecord(u.start, u.loss_start, u.stop, loss_value, norm_value, time.perf_counter() - started,
                        k2=result.k2)
