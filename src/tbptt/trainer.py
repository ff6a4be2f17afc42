"""The trainer: applies each TBPTT update of the engine with an optimizer.

``train_on`` continues one stream per batch row across calls. Every update is checked, with one
host sync, for a finite loss, gradient and updated weights; a step that fails the check is undone
(weights and optimizer state as before it) and recorded as skipped, or raises.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from . import checkpoint
from . import state as st
from .checkpointing import Segments
from .contract import LossFn
from .budget import BudgetMeter
from .data.streams import Split
from .engine import ResetFn, Strategy, StreamEngine, UpdateResult, Updates
from .fit import FitLoop, FitOptions, evaluate
from .modelcheck import ModelContractError
from .modelcheck import check_model as check_contract
from .precision import PRECISIONS, LossScaler, Precision, autocast_for, float32_losses
from .precision import precision_state, saved_loss_scale
from .records import History, NonFiniteError, UpdateRecord
from .safestep import (
    StepUndo,
    check_optimizer,
    check_optimizer_state,
    load_optimizer,
)
from .saved import Fields
from .schedules import Schedule
from .update import NonFinite, apply_update
from .validate import InvalidArgumentType, one_of, positive_int, positive_number

_CHECKED_STEPS = 512  # steps of the first segment that check_model=True runs the checks on


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
    - ``nonfinite``: ``"skip"`` an update whose loss or gradient is not finite, or whose optimizer
      step leaves a weight non-finite (the step is undone: weights and optimizer state as before
      it; the update is recorded with ``skipped=True`` and the reason), or ``"raise"`` a
      ``NonFiniteError`` naming the stream step. Either way the weights never keep it.
    - ``reset_fn(state, rows)``: how a row's state is reset where a sequence starts (default:
      zeros, for any nesting; nn.RNN/GRU/LSTM states handled by their batch dimension 1).
    - ``checkpoint_segments``: cut each recomputed window into this many segments (or
      ``"sqrt"``) whose activations are recomputed in backward: memory for time (Gruslys et al.
      2016), the same gradient.
    - ``check_model``: before the first update, run ``tbptt.check_model`` on the first
      ``train_on`` call's inputs (T >= 8 steps; its first 512 steps at most, from state None,
      with this trainer's ``reset_fn``) and raise ``ModelContractError``, with its report, if the
      model breaks the engine's contract. Runs once; the weights are untouched until it passes.
    - ``precision``: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the model's calls run under
      ``torch.autocast`` at that dtype; weights, optimizer and losses stay float32. ``"fp16"`` scales
      the loss (``loss_scaler``, GradScaler's rule); an update whose scaled gradient overflows is
      skipped, with its reason, and the scale lowered (``tbptt.precision``; docs/reliability.md).
    - ``compile``: compile the model's forward in place (``nn.Module.compile``; a dict: its options,
      e.g. ``{"backend": "aot_eager"}``); pays on CPU for a Python loop over cells, not for nn.LSTM,
      which dynamo runs eagerly (``benchmarks/results/compile-cpu.md``).

    Threads: the Trainer never changes torch's global thread count; run small recurrent models
    with ``torch.set_num_threads(1)`` (the ``tbptt`` commands do, ``--threads``). Their steps are
    small matrix products that a second thread cannot share: measured on ``tbptt train``'s
    defaults (an LSTM of 32 units, 16 streams) on a shared 2-core machine, two threads took 3-14x
    the CPU and the wall time of one, and 1.2-16x at 256 units and 32 streams; never less
    (benchmarks/README.md, "Threads").
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
        precision: Precision = "fp32",
        compile: Union[bool, dict[str, Any]] = False,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        positive_number(clip_grad_norm, "clip_grad_norm", none="no clipping")
        one_of(nonfinite, "nonfinite", ("skip", "raise"))
        one_of(check_model, "check_model", (False, True))
        one_of(precision, "precision", PRECISIONS)
        if not isinstance(compile, (bool, dict)):
            raise InvalidArgumentType("compile", compile, "True, False or a dict of torch.compile's keyword arguments")
        self.loss_scaler: Optional[LossScaler] = LossScaler() if precision == "fp16" else None
        """float16's loss scale (None otherwise); saved with the trainer's ``state_dict``."""
        losses = float32_losses(loss_fn, self.loss_scaler) if precision != "fp32" and callable(loss_fn) else loss_fn
        self.engine = StreamEngine(model, losses, schedule, strategy, reset_fn, checkpoint_segments)
        self.engine.autocast = autocast_for(model, precision)
        check_optimizer(optimizer, model)
        if compile is not False:
            model.compile(**({} if compile is True else compile))
        self.precision, self.compiled = precision, compile
        self._undo = StepUndo(optimizer)
        self._check_pending = bool(check_model)
        self.model = model
        self.optimizer = optimizer
        self.clip_grad_norm = clip_grad_norm
        self.nonfinite = nonfinite
        self.updates_applied = 0
        self.updates_skipped = 0
        self.budget: Optional[BudgetMeter] = None
        """Consulted before each update when set (``fit`` sets it for its budgets): see ``train_on``."""
        self.on_record: Optional[Callable[[UpdateRecord], None]] = None
        """Called with each update's record as soon as it is made, before the next update (``fit``
        sets it: its callbacks and per-update schedulers act between updates, not after a call)."""

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
        max_updates: Optional[int] = None,
    ) -> list[UpdateRecord]:
        """Continue the B streams with ``inputs[B, T, ...]`` and ``targets``; one record per update.

        Updates fall at every k1-th step of the stream however it is cut into calls, and windows
        reach back across calls. Steps after the last update are held until their block closes.
        ``mask[B, T]`` marks valid steps: masked steps inject no error and no gradient, and an
        update's loss is the mean over its valid steps. ``resets[B, T]`` marks where a new sequence
        starts in a row (its state is reset there; no gradient crosses). ``end_of_stream=True``
        ends the streams after this data, as ``reset_state()`` does.

        The call stops early, between two updates, after ``max_updates`` updates or when the
        trainer's ``budget`` (a ``BudgetMeter``; ``fit`` sets one for its budgets) says so. The
        steps are received all the same: the updates not made are ``pending``, and
        ``train_pending()`` or the next ``train_on`` makes them first, exactly as an uninterrupted
        call would have (a call that ended the streams must be followed by ``train_pending()`` or
        ``reset_state()`` before new streams start).

        The model is put in training mode. Padding under a mask may hold anything in the targets;
        the inputs of padded steps must be finite, since other rows' gradients pass through them.
        With ``nonfinite="raise"``, the ``NonFiniteError`` carries the records of the updates this
        call applied before it (``error.records``); the streams stay open where they stood.
        """
        positive_int(max_updates, "max_updates", "updates in this call", "no limit")
        if self._check_pending:
            # a sample of the first segment: long enough for every check, without holding a graph
            # over a whole split when the first segment is one
            report = check_contract(self.model, inputs[:, :_CHECKED_STEPS], reset_fn=self.engine.reset_fn)
            if not report.ok:
                raise ModelContractError(report)
            self._check_pending = False
        return self._make(self.engine.feed(inputs, targets, mask, end_of_stream, resets), max_updates)

    @property
    def pending(self) -> bool:
        """Whether steps received hold updates not made yet (a budget or ``max_updates`` stopped
        the call that received them)."""
        return self.engine.pending

    def train_pending(self, max_updates: Optional[int] = None) -> list[UpdateRecord]:
        """Make the updates still pending (see ``train_on``), within ``max_updates`` and the budget."""
        positive_int(max_updates, "max_updates", "updates in this call", "no limit")
        return self._make(self.engine.updates(), max_updates)

    def _make(self, updates: Updates, max_updates: Optional[int]) -> list[UpdateRecord]:
        """Apply the updates one by one until they end, ``max_updates`` are made or the budget stops."""
        self.model.train()
        self._undo.bound = None  # the weights may have been changed since the last call: measure them again
        records: list[UpdateRecord] = []
        meter = self.budget  # counts the training's cost whatever the budget; stops only a counted one
        stops = meter is not None and meter.stops_updates
        started = time.perf_counter()
        try:
            with updates, (meter.training() if meter is not None else nullcontext()):
                if meter is not None:
                    meter.mark()
                while max_updates is None or len(records) < max_updates:
                    if stops and self.agree_to_stop(meter.should_stop()):
                        break
                    result = next(updates, None)
                    if result is None:
                        break
                    records.append(self._apply(result, started))
                    if meter is not None:
                        meter.update_done()
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
            "precision": precision_state(self.precision, self.loss_scaler),
        }

    def load_state_dict(self, saved: Any) -> None:
        """Continue from ``state_dict()``: the same schedule and strategy are required. Every field
        is checked (a ``CheckpointError`` naming a missing, mistyped or impossible one) before the
        model changes. The same ``precision`` is required (a checkpoint without one was ``"fp32"``):
        the stored strategy's kept activations are recomputed on loading, at this precision."""
        f = Fields(saved, "")
        checkpoint.check_model(f.raw("model"), self.model)
        counters = Fields(f.raw("trainer"), "trainer")
        applied, skipped = counters.int("updates_applied"), counters.int("updates_skipped")
        scaler = saved_loss_scale(f, self.precision)
        check_optimizer_state(self.optimizer, f.raw("optimizer"))
        # the model first, so that kept stored segments are rebuilt with its saved buffers (and put
        # back as they were if the streams are refused); again after, since rebuilding ran forward
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(saved["model"])
        try:
            self.engine.load_state_dict(f.raw("engine"))
        except BaseException:
            self.model.load_state_dict(before)
            raise
        load_optimizer(self.optimizer, f.raw("optimizer"))
        self.model.load_state_dict(saved["model"])
        self.updates_applied, self.updates_skipped = applied, skipped
        if self.loss_scaler is not None and scaler is not None:
            self.loss_scaler.load_state_dict(scaler)

    def fit(self, train: Any, epochs: Optional[int] = None, valid: Any = None, **options: Any) -> History:
        """Train for ``epochs`` passes over ``train`` (a ``tbptt.data.Split`` or a tuple
        ``(inputs, targets[, mask[, resets]])``); each epoch streams it from fresh states.

        Options: ``segment_length`` (steps per ``train_on`` call; default the whole split),
        ``metric(outputs, targets, mask) -> float`` (reported on ``valid``), ``scheduler`` and
        ``scheduler_interval`` ("epoch" or "update"; ReduceLROnPlateau gets the validation loss),
        ``callbacks`` (objects with ``on_update(trainer, record)`` and/or
        ``on_epoch_end(trainer, info) -> stop?``), ``patience`` (early stopping on validation
        loss) and ``restore_best``, ``checkpoint`` (path) with ``checkpoint_every`` (updates) and
        ``resume`` (refused on other training data than the checkpoint's unless
        ``allow_data_change=True``), ``log`` (``.jsonl``/``.csv``), ``progress`` (None: a bar only on
        a terminal), ``max_seconds``, ``keep_updates`` (keep every update's record in
        ``History.updates`` and in checkpoints; otherwise the history holds running summaries of a
        fixed size), ``max_graph_bytes`` (refuse, before the first update, a run whose graph would
        be larger; default: the memory available on the model's device). Output paths are checked
        before the first update. Returns the ``History``.
        """
        return FitLoop(self, train, valid, FitOptions(epochs=epochs, **options)).run()

    def evaluate(self, data: Any, metric: Optional[Callable] = None, segment_length: Optional[int] = None) -> dict:
        """Loss and metric on a split from fresh states, without gradient; training streams untouched."""
        return evaluate(self, data, metric, segment_length)

    def data_fingerprint(self, split: Split) -> dict:
        """What identifies the training data (``Split.fingerprint``), saved in ``fit``'s checkpoints
        so that a resume on other data is refused; data-parallel training fingerprints all ranks'
        rows together."""
        return split.fingerprint()

    def after_update(self, record: UpdateRecord) -> None:
        """Called after every update, applied or skipped; data-parallel training checks there, every
        few updates, that the ranks' weights have not drifted apart."""

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
        self._undo.bound = None
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
        record = apply_update(self.reduce(result), result.params or self.engine.named_parameters(), self.optimizer,
                              self.clip_grad_norm, self.nonfinite, started, self._undo, self.loss_scaler)
        if record.skipped:
            self.updates_skipped += 1
        else:
            self.updates_applied += 1
        self.after_update(record)
        if self.on_record is not None:
            self.on_record(record)
            self._undo.bound = None  # a callback may have changed the weights
        return record
