"""``TBPTTModule``: TBPTT(k1, k2) as a LightningModule, run by the engine under manual optimization.

Each ``training_step`` feeds the next segment of the B streams to a ``StreamEngine`` and applies
every update that closes inside it with ``tbptt.update.apply_update`` (finite checks, clipping,
records: what ``Trainer.train_on`` does) through Lightning's optimizer, so that Lightning counts
each update as a step and its hooks, loggers, callbacks and strategy see it. The engine computes
gradients with ``torch.autograd.grad`` on the module itself, never through a strategy's wrapper:
under DDP no backward hook fires, and each update is combined across ranks once, weighted by valid
steps (``tbptt.distributed.combine_ranks``). See ``docs/lightning.md``.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

try:
    import lightning.pytorch as pl
except ModuleNotFoundError as exc:  # pragma: no cover - the extra is what installs it
    raise ModuleNotFoundError("tbptt.lightning needs Lightning 2.x: pip install 'tbptt[lightning]'") from exc

from .. import checkpoint as ckpt
from ..checkpointing import Segments
from ..contract import LossFn, masked_sum, step_losses
from ..distributed import combine_ranks, merge_streams, shard_streams, streams_to_cpu
from ..engine import ResetFn, StreamEngine, Strategy, UpdateResult
from ..records import UpdateRecord
from ..schedules import Schedule
from ..update import NonFinite, apply_update
from ..validate import one_of, positive_number
from .checks import as_segment, check_loaders, check_parts, check_trainer
from .loader import SegmentBatch

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
_PER_STEP = {"on_step": True, "on_epoch": False, "batch_size": 1}
_PER_EPOCH = {"on_step": False, "on_epoch": True, "batch_size": 1, "sync_dist": True}


class TBPTTModule(pl.LightningModule):
    """A LightningModule that trains ``model`` with TBPTT(k1, k2) on segments of B streams.

    - ``model(inputs[B, T, ...], state) -> (outputs[B, T, ...], new_state)``, ``loss_fn(outputs,
      targets) -> [B, T]`` per-step losses; a subclass may override ``forward`` and ``step_losses``
      instead (and pass None).
    - ``optimizer``: ``params -> torch.optim.Optimizer``; ``scheduler``: ``optimizer -> LR scheduler``
      stepped per ``scheduler_interval`` ("epoch" or "update"; ``ReduceLROnPlateau`` reads the
      logged ``scheduler_monitor``). Or override ``configure_optimizers`` (one optimizer; a
      scheduler's ``interval`` "step" means per update).
    - ``schedule``, ``strategy``, ``clip_grad_norm``, ``nonfinite``, ``reset_fn``,
      ``checkpoint_segments``: as ``tbptt.Trainer`` takes them. ``Trainer(gradient_clip_val=...)``
      (by norm) is used when ``clip_grad_norm`` is not given.

    Train on ``tbptt.lightning.segments(...)``: each ``training_step`` gets the next segment and
    applies every update inside it, as ``tbptt.Trainer.train_on`` would. ``updates_applied``,
    ``updates_skipped`` and ``records`` (one ``UpdateRecord`` per update of this fit) say what it did.
    """

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        loss_fn: Optional[LossFn] = None,
        optimizer: Optional[OptimizerFactory] = None,
        schedule: Optional[Schedule] = None,
        strategy: Strategy = "recompute",
        clip_grad_norm: Optional[float] = None,
        nonfinite: NonFinite = "skip",
        reset_fn: Optional[ResetFn] = None,
        checkpoint_segments: Segments = None,
        scheduler: Optional[SchedulerFactory] = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val_loss",
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        overridden = {name for name in ("forward", "step_losses")
                      if getattr(type(self), name) is not getattr(TBPTTModule, name)}
        check_parts(model, loss_fn, optimizer, scheduler, schedule, overridden)
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.clip_grad_norm = positive_number(clip_grad_norm, "clip_grad_norm", none="no clipping")
        self.nonfinite = one_of(nonfinite, "nonfinite", ("skip", "raise"))
        self.scheduler_interval = one_of(scheduler_interval, "scheduler_interval", ("epoch", "update"))
        self.scheduler_monitor = scheduler_monitor
        # the engine runs this module (its forward, its parameters), never a strategy's wrapper of it
        self.engine = StreamEngine(self, self.step_losses, schedule, strategy, reset_fn, checkpoint_segments)
        self.updates_applied = 0
        self.updates_skipped = 0
        self.records: list[UpdateRecord] = []
        self._epoch_records: list[UpdateRecord] = []
        self._rows: Optional[int] = None
        self._restored: Optional[dict] = None
        self._resumed_open = False
        self._lightning_clip: Optional[float] = None
        self._hidden_clip: Optional[tuple[Any, float]] = None
        self._valid: tuple[Any, float, float] = (None, 0.0, 0.0)

    @property
    def schedule(self) -> Schedule:
        return self.engine.schedule

    # ------------------------------------------------------------------------------------------
    # what a subclass may override
    def forward(self, inputs: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """``(outputs[B, T, ...], new_state)``: the model run over ``inputs`` from ``state``."""
        assert self.model is not None
        return self.model(inputs, state)

    def step_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-step losses ``[B, T]`` of ``outputs`` against ``targets``."""
        assert self.loss_fn is not None
        return self.loss_fn(outputs, targets)

    def configure_optimizers(self) -> Any:
        """The optimizer from ``optimizer(self.parameters())`` and, if given, its scheduler."""
        if self.optimizer_factory is None:
            raise ValueError(
                f"{type(self).__name__} has no optimizer: pass optimizer=lambda params: torch.optim.Adam(params, "
                "1e-3) or override configure_optimizers"
            )
        optimizer = self.optimizer_factory(self.parameters())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer(params) must return a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if self.scheduler_factory is None:
            return optimizer
        interval = "step" if self.scheduler_interval == "update" else "epoch"
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": interval}}

    # ------------------------------------------------------------------------------------------
    # checks before Lightning's own (which would refuse gradient_clip_val under manual optimization)
    @property
    def trainer(self) -> "pl.Trainer":
        return pl.LightningModule.trainer.fget(self)  # type: ignore[attr-defined]

    @trainer.setter
    def trainer(self, trainer: Optional["pl.Trainer"]) -> None:
        if trainer is not None:
            self._check_trainer(trainer)
        pl.LightningModule.trainer.fset(self, trainer)  # type: ignore[attr-defined]

    def _check_trainer(self, trainer: "pl.Trainer") -> None:
        # streams read before this run (load_from_checkpoint) are not this run's; a ckpt_path of
        # this run is read after this point
        self._restored = self._hidden_clip = None
        self._lightning_clip = check_trainer(trainer, type(self).__name__, self.automatic_optimization,
                                             self.clip_grad_norm)
        if self._lightning_clip is not None:
            # Lightning refuses gradient_clip_val under manual optimization, since it cannot see the
            # steps; this module clips each update itself, so the value is hidden from that check
            # until setup() puts it back
            self._hidden_clip = (trainer, trainer.gradient_clip_val)
            trainer.gradient_clip_val = None

    def setup(self, stage: str) -> None:
        if self._hidden_clip is not None:
            trainer, clip = self._hidden_clip
            trainer.gradient_clip_val, self._hidden_clip = clip, None

    # ------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        check_loaders(self.trainer.train_dataloader, "train_dataloaders")
        if math.isinf(self.trainer.num_training_batches):
            raise ValueError(
                "the train loader has no len(): TBPTTModule must know a pass's last segment, where the streams "
                "end; give the loader __len__, or use tbptt.lightning.segments(...)"
            )
        self._share_plan()
        if self._restored is not None:
            self._resume(self._restored)
            self._restored = None
            return
        self.engine.reset()
        self.updates_applied = self.updates_skipped = 0
        self.records, self._epoch_records, self._rows = [], [], None

    def on_train_epoch_start(self) -> None:
        self._epoch_records = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        segment = as_segment(batch, batch_idx, self.trainer.num_training_batches)
        self._continue_streams(segment, batch_idx)
        optimizer = self.optimizers()
        if isinstance(optimizer, list):
            raise ValueError(f"TBPTTModule steps one optimizer per update; configure_optimizers gave {len(optimizer)}")
        named = self.engine.named_parameters()
        clip = self.clip_grad_norm if self.clip_grad_norm is not None else self._lightning_clip
        started = time.perf_counter()
        records = []
        for result in self.engine.feed(segment.inputs, segment.targets, segment.mask, segment.end_of_stream,
                                       segment.resets):
            records.append(apply_update(self._combine(result, named), named, optimizer, clip, self.nonfinite, started))
            self._count(records[-1])
            started = time.perf_counter()
        self.log_updates(records)
        if segment.end_of_stream:
            # epoch schedulers step as the pass ends, so that a checkpoint taken after this segment
            # holds the step (Lightning skips a resumed epoch's end); ReduceLROnPlateau waits for
            # the validation at on_train_epoch_end
            self._step_schedulers("epoch", plateau=False)

    def on_train_epoch_end(self) -> None:
        records = self._epoch_records
        applied = [r.loss for r in records if not r.skipped]
        norms = [r.grad_norm for r in records]
        epoch = {
            "train_loss_epoch": statistics.fmean(applied) if applied else math.nan,
            "grad_norm_median_epoch": statistics.median(norms) if norms else math.nan,
            "grad_norm_max_epoch": max(norms, default=math.nan),
            "updates_epoch": len(records),
            "skipped_epoch": len(records) - len(applied),
        }
        for key, value in epoch.items():
            self.log(key, float(value), **_PER_EPOCH)
        if self.engine.position == 0:  # the pass reached its end (not a stop inside the epoch)
            self._step_schedulers("epoch", plateau=True)

    def _continue_streams(self, segment: SegmentBatch, batch_idx: int) -> None:
        """Check that the segment continues the open streams (or starts a pass) with the same rows."""
        if self._resumed_open and segment.start is None:
            raise ValueError(
                "resuming inside an epoch needs a loader that resumes there too, and this one gives plain "
                "tuples; use tbptt.lightning.segments(...), whose state Lightning's checkpoint keeps"
            )
        self._resumed_open = False
        starts_pass = batch_idx == 0 if segment.start is None else segment.start == 0
        if starts_pass and self.engine.position > 0:
            self.engine.reset()  # the last pass stopped before its end (max_steps, a batch limit): new streams
        if segment.start is not None and segment.start != self.engine.position:
            raise RuntimeError(
                f"the loader gave the segment at step {segment.start} but the streams stand at step "
                f"{self.engine.position}: the checkpoint's streams and the loader's position disagree (was "
                "the run resumed with another loader, or a checkpoint taken between a stop and a new pass?)"
            )
        rows = segment.inputs.shape[0]
        if self.engine.position > 0 and rows != self._rows:
            raise ValueError(
                f"segment {batch_idx} holds {rows} streams but this epoch's streams are {self._rows}: each segment "
                "must continue the same rows, one step after another (a loader over rows, such as "
                "DataLoader(TensorDataset(...), batch_size=...), gives other streams, not their next steps); "
                "use tbptt.lightning.segments(inputs, targets, segment_length)"
            )
        self._rows = rows

    def _share_plan(self) -> None:
        """Under several ranks every update gets the same window: ARTBP's draws start from rank 0's
        generator, an adaptive schedule's measurements are summed over the ranks' rows."""
        if self.trainer.world_size == 1:
            return
        if self.engine.generator is not None:
            state = [self.engine.generator.get_state()]
            dist.broadcast_object_list(state, src=0)
            self.engine.generator.set_state(state[0])
        self.engine.combine = lambda sums: _all_reduced(sums.to(self.device)).cpu()

    def _combine(self, result: UpdateResult, named: list[tuple[str, nn.Parameter]]) -> UpdateResult:
        """The update combined over the ranks (weighted by valid steps), once, before it is checked."""
        if self.trainer.world_size == 1:
            return result
        return combine_ranks(result, named, _all_reduced)

    def _count(self, record: UpdateRecord) -> None:
        self.records.append(record)
        self._epoch_records.append(record)
        if record.skipped:
            self.updates_skipped += 1
        else:
            self.updates_applied += 1
            self._step_schedulers("step", plateau=None)

    def log_updates(self, records: list[UpdateRecord]) -> None:
        """Log what a training step's updates did: the last applied one's loss and gradient norm, and
        the updates applied and skipped so far. Called once per training step, not per update
        (Lightning keeps one value per step and key, and each ``self.log`` costs most of a
        millisecond on a small CPU, see docs/lightning.md); override to log more or less."""
        applied = [r for r in records if not r.skipped]
        if applied:
            self.log("train_loss", applied[-1].loss, prog_bar=True, **_PER_STEP)
            self.log("grad_norm", applied[-1].grad_norm, **_PER_STEP)
        self.log("updates", float(self.updates_applied), **_PER_STEP)
        self.log("skipped", float(self.updates_skipped), **_PER_STEP)

    def _step_schedulers(self, interval: str, plateau: Optional[bool]) -> None:
        """Step the schedulers of ``interval`` ("step": after each applied update; "epoch"), as
        Lightning does under automatic optimization (and leaves to the module under manual); only
        ``ReduceLROnPlateau`` ones, or only the others, when ``plateau`` says so."""
        for config in self.trainer.lr_scheduler_configs:
            count = self.updates_applied if interval == "step" else self.current_epoch + 1
            watches = isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            if config.interval != interval or count % config.frequency or plateau not in (None, watches):
                continue
            if watches:
                metrics = self.trainer.callback_metrics
                if self.scheduler_monitor not in metrics:
                    raise ValueError(
                        f"ReduceLROnPlateau watches scheduler_monitor={self.scheduler_monitor!r}, which was not "
                        f"logged (logged: {sorted(metrics)}); name one of those"
                    )
                config.scheduler.step(metrics[self.scheduler_monitor])
            else:
                config.scheduler.step()

    # ------------------------------------------------------------------------------------------
    # validation: the state carried across the loader's segments from a fresh start, no graph
    def on_validation_epoch_start(self) -> None:
        check_loaders(self.trainer.val_dataloaders, "val_dataloaders")
        self._valid = (None, 0.0, 0.0)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        segment = as_segment(batch, batch_idx, math.inf)
        state, total, count = self._valid
        if batch_idx == 0:
            state = None
        outputs, state = self.engine.forward(segment.inputs, state, segment.resets)
        s, c = masked_sum(step_losses(self.step_losses, outputs, segment.targets, segment.mask), segment.mask)
        self._valid = (state, total + s.double(), count + c.double())

    def on_validation_epoch_end(self) -> None:
        _, total, count = self._valid
        both = torch.tensor([float(total), float(count)], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            _all_reduced(both)  # the mean over every rank's valid steps, as one process would have it
        self.log("val_loss", float(both[0] / both[1].clamp_min(1)), prog_bar=True, **_PER_EPOCH)
        self._valid = (None, 0.0, 0.0)

    # ------------------------------------------------------------------------------------------
    # checkpoints: the streams of every rank, as DistributedTrainer writes them
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        mine = {"engine": streams_to_cpu(self.engine.state_dict()), "rng": ckpt.rng_state()}
        world = self.trainer.world_size
        every = [mine]
        if world > 1:
            every = [None] * world
            dist.all_gather_object(every, mine)
        engines = [e["engine"] for e in every]
        checkpoint["tbptt"] = {
            # all B rows, as one process would hold them (for a resume on another number of ranks)
            "engine": engines[0] if world == 1 else merge_streams(engines, self, self.engine.reset_fn),
            "engine_ranks": engines,
            "rng_ranks": [e["rng"] for e in every],
            "world_size": world,
            "trainer": {"updates_applied": self.updates_applied, "updates_skipped": self.updates_skipped},
            "epoch_records": [r.as_dict() for r in self._epoch_records],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "tbptt" not in checkpoint:
            raise ckpt.CheckpointError(
                "the checkpoint holds no TBPTT streams (no 'tbptt' entry): it was not written by a TBPTTModule"
            )
        self._restored = checkpoint["tbptt"]  # taken up at on_train_start, once the weights are in place

    def _resume(self, saved: dict[str, Any]) -> None:
        world, rank = self.trainer.world_size, self.global_rank
        same = saved["world_size"] == world
        try:
            if same:
                engine = shard_streams(saved["engine_ranks"][rank], 0, 1, self.device)
            else:
                engine = shard_streams(saved["engine"], rank, world, self.device)
            self.engine.load_state_dict(engine)
        except ValueError as exc:
            raise ckpt.CheckpointError(f"the checkpoint's streams do not fit this module: {exc}") from exc
        if same or rank == 0:
            ckpt.set_rng_state(saved["rng_ranks"][rank if same else 0])
        self.updates_applied = saved["trainer"]["updates_applied"]
        self.updates_skipped = saved["trainer"]["updates_skipped"]
        self._epoch_records = [UpdateRecord(**r) for r in saved["epoch_records"]]
        self.records = []
        self._rows = engine["batch_size"]
        self._resumed_open = self.engine.position > 0


def _all_reduced(buffer: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(buffer)
    return buffer
