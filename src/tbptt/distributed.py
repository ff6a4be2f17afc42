"""Data-parallel TBPTT on ``torch.distributed``: each rank carries its own share of the B streams
and every update's gradient is averaged across ranks once, whatever backward passes made it.

``DistributedTrainer`` is a ``Trainer`` whose ``reduce`` all-reduces each update (one flat
all-reduce, weighted by valid steps, so the result is the gradient of the mean over all ranks'
valid steps). Checkpoints are written by rank 0 in the single-process format (all B rows), so a
run resumes on any number of ranks, or on one process with a plain ``Trainer``. See
``docs/distributed.md``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from functools import reduce as fold
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import state as st
from .data.streams import Split, as_split
from .engine import UpdateResult
from .records import History
from .saved import Fields
from .stream_state import StreamState, merge_rows
from .trainer import Trainer
from .validate import one_of, positive_int, positive_number

DEFAULT_TIMEOUT = 300.0
"""Seconds a collective may wait for the other ranks before the job fails."""

DRIFT_CHECK_EVERY = 100
"""Updates between two comparisons of the ranks' parameters, by default."""

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# the single-process readers and writers; DistributedTrainer.fit routes fit's calls through its own


class DistributedError(RuntimeError):
    """Ranks that disagree, or a collective that failed because another rank stopped or died."""


def in_torchrun_env() -> bool:
    """Whether this process was started by torchrun (its rendezvous variables are set)."""
    return all(k in os.environ for k in TORCHRUN_ENV)


def init_from_env(backend: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, int]:
    """Join the process group described by torchrun's environment; returns (rank, world size).

    ``backend``: "gloo" or "nccl" (default: nccl when CUDA is available, else gloo). With nccl the
    process uses the GPU ``LOCAL_RANK``. ``timeout``: seconds any collective may wait for the other
    ranks; past it the job fails with an error instead of hanging. Does nothing but report the rank
    when the group is already initialised.
    """
    positive_number(timeout, "timeout", "seconds")
    one_of(backend, "backend", (None, "gloo", "nccl"))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise DistributedError(
            f"torchrun's environment is missing {', '.join(missing)}; launch the job with "
            "`torchrun --nproc_per_node N ...` (or set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # without it a timed-out NCCL collective blocks forever instead of raising
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    except RuntimeError as exc:  # the rendezvous' store errors (a rank that never joined) included
        raise DistributedError(
            f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: joining the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} failed within {timeout:g} s; is every rank "
            f"started, with the same MASTER_ADDR and MASTER_PORT? {exc}"
        ) from exc
    return dist.get_rank(), dist.get_world_size()


class DistributedTrainer(Trainer):
    """A ``Trainer`` for one rank of a data-parallel job on an initialised process group.

    Takes ``Trainer``'s arguments, ``group`` (None: the default group) and ``check_every``. At
    construction the ranks compare what they must agree on (the model's parameter names, shapes and
    dtypes; the optimizer's class and each group's hyper-parameters; clipping, schedule, errors,
    strategy, non-finite rule, checkpointed segments, precision, compile) and fail with a
    ``DistributedError`` naming the setting and the ranks; then rank 0's parameters and buffers are
    broadcast. Every ``check_every`` updates (default 100; None: never) the ranks compare checksums
    of their parameters, so that weights drifting apart (an optimizer or scheduler changed on one
    rank) stop the run. Give each rank its own rows (``shard``) and the same validation split; every update is
    then the update one process would make with all the rows (``reduce``). ``fit`` checkpoints
    through rank 0 (``save_checkpoint``/``load_checkpoint``).
    """

    def __init__(self, *args: Any, group: Optional[dist.ProcessGroup] = None,
                 check_every: Optional[int] = DRIFT_CHECK_EVERY, **kwargs: Any) -> None:
        if not dist.is_initialized():
            raise DistributedError(
                "DistributedTrainer needs an initialised process group: call "
                "tbptt.distributed.init_from_env() under torchrun, or torch.distributed.init_process_group()"
            )
        positive_int(check_every, "check_every", "updates between checks of the ranks' weights", "never")
        super().__init__(*args, **kwargs)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._root = 0 if group is None else dist.get_global_rank(group, 0)
        self._rows: Optional[int] = None
        self.check_every = check_every
        self._updates_seen = 0
        self._agree(self._settings(), "every rank must build the same model, optimizer and trainer")
        self._broadcast_model()
        self._share_plan()

    # ------------------------------------------------------------------------------------------
    def shard(self, data: Any) -> Split:
        """This rank's contiguous share of the rows of a split (``Split.rows(rank, world)``)."""
        split = as_split(data, "data")
        return split.rows(self.rank, self.world_size)

    def reduce(self, result: UpdateResult) -> UpdateResult:
        """The update as if one process held every rank's rows (``combine_ranks``): one all-reduce."""

        def summed(buffer: torch.Tensor) -> torch.Tensor:
            self._collective(dist.all_reduce, buffer,
                             what=f"the all-reduce of the update at stream step {result.update.stop}")
            return buffer

        return combine_ranks(result, result.params or self.engine.named_parameters(), summed)

    def data_fingerprint(self, split: Split) -> dict:
        """The fingerprint of all ranks' rows together (rank order = row order): the same as one
        process holding every row computes, whatever the number of ranks."""
        every: list[Any] = [None] * self.world_size
        self._collective(dist.all_gather_object, every, split.checksums(), what="fingerprinting the training data")
        return split.fingerprint(torch.cat(every))

    def after_update(self, record: Any) -> None:
        """Every ``check_every`` updates, compare the ranks' parameters (``check_drift``)."""
        self._updates_seen += 1
        if self.check_every is not None and self._updates_seen % self.check_every == 0:
            self.check_drift()

    def check_drift(self) -> None:
        """Raise ``DistributedError`` naming the first parameter that differs between ranks: one
        small all-reduce of three float64 checksums per parameter (max and min over the ranks), and
        an all-gather to name the rank only when they differ."""
        sums = torch.stack([_checksum(p) for _, p in self.model.named_parameters()]).to(self._device())
        both = torch.cat([sums, -sums])
        self._collective(dist.all_reduce, both, dist.ReduceOp.MAX, what="comparing the ranks' weights")
        if bool((both[: len(sums)] != -both[len(sums):]).any()):
            self.check_consistency(list(self.model.named_parameters()))

    def check_consistency(self, named: Optional[list[tuple[str, torch.Tensor]]] = None) -> None:
        """Raise ``DistributedError`` naming the first parameter or buffer (or tensor of ``named``)
        that differs between ranks (compared by three float64 checksums per tensor: cheap enough to
        call every epoch)."""
        named = self._model_tensors() if named is None else named
        sums = torch.stack([_checksum(t) for _, t in named]).to(self._device())
        every = [torch.empty_like(sums) for _ in range(self.world_size)]
        self._collective(dist.all_gather, every, sums, what="the consistency check")
        for r, theirs in enumerate(every):
            differs = (theirs != every[0]).any(dim=1).nonzero().flatten().tolist()
            if differs:
                more = f" (and {len(differs) - 1} more tensors)" if len(differs) > 1 else ""
                raise DistributedError(
                    f"rank {r} holds a different {named[differs[0]][0]!r} than rank 0{more}: ranks have drifted "
                    "apart; was the model, the optimizer or a scheduler changed outside the trainer on some rank?"
                )

    # ------------------------------------------------------------------------------------------
    def fit(self, train: Any, epochs: Optional[int] = None, valid: Any = None, **options: Any) -> History:
        """``Trainer.fit`` on this rank's rows (``train``), with the whole ``valid`` split on every
        rank. Ranks are first checked to agree on everything that decides when they communicate;
        only rank 0 writes the log, shows progress and writes checkpoints."""
        split = as_split(train, "train")
        self._rows = split.inputs.shape[0]
        checkpoint = options.get("checkpoint")
        facts = {
            "steps per row of train": split.inputs.shape[1],
            "epochs": epochs,
            "schedule": str(self.schedule),
            "strategy": self.strategy,
            "options": repr(sorted((k, v) for k, v in options.items()
                                   if k in ("segment_length", "checkpoint_every", "patience", "scheduler_interval",
                                            "resume", "restore_best"))),
            "valid split": None if valid is None else as_split(valid, "valid").fingerprint(),
            "checkpoint path": None if checkpoint is None else os.path.abspath(checkpoint),
        }
        if checkpoint is not None:
            facts["rows of train"] = self._rows
            facts["checkpoint exists"] = os.path.exists(checkpoint)
        self._agree(facts, "every rank must train on the same number of steps with the same settings and "
                    "validate on the same split")
        if self.rank != 0:
            options = {**options, "log": None, "progress": False}
        return super().fit(train, epochs, valid, **options)

    def save_checkpoint(self, payload: dict[str, Any], path: Any) -> None:
        """Write ``fit``'s checkpoint from rank 0, with every rank's rows gathered into one stream
        state of all B rows (and, for a resume on as many ranks, each rank's own stream and RNG
        states); all ranks return once it is on disk."""
        mine = (streams_to_cpu(payload["engine"]), payload["rng"])
        gathered: Optional[list] = [None] * self.world_size if self.rank == 0 else None
        self._collective(dist.gather_object, mine, gathered, dst=self._root, what="gathering the checkpoint")
        failure: list[Optional[str]] = [None]
        error: Optional[Exception] = None
        if self.rank == 0:
            assert gathered is not None
            try:
                engine = merge_streams([g[0] for g in gathered], self.model, self.engine.reset_fn)
                ckpt.save({**payload, "engine": engine, "engine_ranks": [g[0] for g in gathered],
                        "rng_ranks": [g[1] for g in gathered], "world_size": self.world_size}, path)
            except Exception as exc:
                failure[0] = f"{type(exc).__name__}: {exc}"
                error = exc
        self._collective(dist.broadcast_object_list, failure, src=self._root, what="confirming the checkpoint")
        if failure[0] is not None:
            if error is not None:
                raise error
            raise ckpt.CheckpointError(f"rank 0 could not write the checkpoint {path}: {failure[0]}")

    def load_checkpoint(self, path: Any) -> dict[str, Any]:
        """Read a checkpoint (from any number of ranks, or one process) with this rank's rows of the
        streams. On as many ranks as saved, each rank gets back exactly its own stream and RNG
        states; on another number, its share of all rows, and ranks past 0 keep their RNG."""
        saved = ckpt.load(path)
        f = Fields(saved, "")
        engine = StreamState.from_dict(f.raw("engine")).to_dict()
        rows = engine["batch_size"]
        if rows is not None and self._rows is not None and rows != self._rows * self.world_size:
            raise ckpt.CheckpointError(
                f"{path} holds {rows} streams but {self.world_size} ranks train {self._rows} rows each "
                f"({self._rows * self.world_size} in all); resume on the same data"
            )
        if saved.get("world_size") == self.world_size:
            # the same ranks: each takes back exactly what it held (bit for bit, as one process does)
            mine, rng = (f.list(key) for key in ("engine_ranks", "rng_ranks"))
            if len(mine) != self.world_size or len(rng) != self.world_size:
                raise ckpt.CheckpointError(f"{path}: checkpoint fields engine_ranks and rng_ranks must hold "
                                           f"{self.world_size} ranks' states; they hold {len(mine)} and {len(rng)}")
            saved["engine"] = shard_streams(mine[self.rank], 0, 1, self._device(), f"engine_ranks[{self.rank}]")
            saved["rng"] = rng[self.rank]
            return saved
        try:
            saved["engine"] = shard_streams(engine, self.rank, self.world_size, self._device())
        except ValueError as exc:
            raise ckpt.CheckpointError(f"{path}: {exc}") from exc
        if self.rank != 0:
            saved["rng"] = ckpt.rng_state()  # another world size: ranks past 0 keep their own generators
        return saved

    # ------------------------------------------------------------------------------------------
    def _model_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.model.named_parameters()) + list(self.model.named_buffers())

    def _device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _broadcast_model(self) -> None:
        """Rank 0's weights and buffers on every rank: one broadcast per (device, dtype)."""
        kinds: dict[tuple, list[torch.Tensor]] = {}
        for _, t in self._model_tensors():
            kinds.setdefault((t.device, t.dtype), []).append(t)
        with torch.no_grad():
            for tensors in kinds.values():
                flat = torch.cat([t.reshape(-1) for t in tensors])
                self._collective(dist.broadcast, flat, src=self._root, what="broadcasting rank 0's weights")
                for t, part in zip(tensors, torch.split(flat, [t.numel() for t in tensors])):
                    t.copy_(part.view(t.shape))

    def _share_plan(self) -> None:
        """Every rank follows rank 0's schedule: ARTBP's draws start from rank 0's generator, and an
        adaptive schedule's measurements are summed over all ranks' rows before k2 is chosen, so that
        every update has the same L or k2 on every rank (the one a single process would choose)."""
        engine = self.engine
        if engine.generator is not None:
            state = [engine.generator.get_state()]
            self._collective(dist.broadcast_object_list, state, src=self._root, what="sharing rank 0's ARTBP draws")
            engine.generator.set_state(state[0])

        def combine(sums: torch.Tensor) -> torch.Tensor:
            total = sums.to(self._device())
            self._collective(dist.all_reduce, total, what="summing a measurement of the gradient's decay")
            return total.cpu()

        engine.combine = combine

    def _settings(self) -> dict[str, Any]:
        """What every rank must have alike, as plain data: the model's tensors, the optimizer and
        the trainer's settings."""
        facts: dict[str, Any] = {"parameter names": [n for n, _ in self._model_tensors()]}
        for name, t in self._model_tensors():
            facts[f"parameter {name}"] = f"shape {tuple(t.shape)}, {t.dtype}"
        facts["optimizer"] = type(self.optimizer).__name__
        facts["optimizer param groups"] = len(self.optimizer.param_groups)
        for i, group in enumerate(self.optimizer.param_groups):
            facts[f"optimizer group {i} parameters"] = len(group["params"])
            for key, value in sorted((k, v) for k, v in group.items() if k != "params"):
                facts[f"optimizer group {i} {key}"] = value.tolist() if isinstance(value, torch.Tensor) else value
        facts.update({"clip_grad_norm": self.clip_grad_norm, "schedule": str(self.schedule),
                      "errors": self.schedule.errors, "strategy": self.strategy, "nonfinite": self.nonfinite,
                      "checkpoint_segments": self.engine.checkpoint_segments, "check_every": self.check_every,
                      "precision": self.precision, "compile": self.compiled})
        return facts

    def _agree(self, facts: dict[str, Any], rule: str) -> None:
        """Raise ``DistributedError`` naming the first of ``facts`` on which ranks differ, and which
        ranks hold which value."""
        every: list[Any] = [None] * self.world_size
        self._collective(dist.all_gather_object, every, facts, what="comparing the ranks' settings")
        for key in list(facts) + [k for f in every for k in f if k not in facts]:
            values = [f.get(key, "(missing)") for f in every]
            if any(v != values[0] for v in values):
                ranks: dict[str, list[int]] = {}
                for r, v in enumerate(values):
                    ranks.setdefault(repr(v), []).append(r)
                held = "; ".join(f"{v} on rank{'s' * (len(rs) > 1)} {', '.join(map(str, rs))}" for v, rs in ranks.items())
                raise DistributedError(f"ranks disagree on {key}: {held}; {rule}")

    def agree_to_stop(self, stop: bool) -> bool:
        """Every rank stops if any rank wants to (its clock ran out, a callback said so, its
        validation diverged), so that no rank waits for an update the others will not make."""
        flag = torch.tensor([1.0 if stop else 0.0], device=self._device())
        self._collective(dist.all_reduce, flag, dist.ReduceOp.MAX, what="agreeing whether to stop")
        return bool(flag.item())

    def _collective(self, op: Any, *args: Any, what: str, **kwargs: Any) -> None:
        try:
            op(*args, group=self.group, **kwargs)
        except RuntimeError as exc:
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed; another rank has probably stopped "
                f"or died (see its error) or did not answer within the timeout. {exc}"
            ) from exc


def combine_ranks(
    result: UpdateResult,
    named: list[tuple[str, torch.nn.Parameter]],
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor],
) -> UpdateResult:
    """One rank's update as if one process held every rank's rows: gradients and loss weighted by
    each rank's valid steps, summed over the ranks by ``sum_over_ranks`` (one all-reduce of a flat
    buffer, returning the sum) and divided by the total count. A gradient that is None on some
    ranks counts as zeros there; None on every rank stays None (``docs/distributed.md``)."""
    device = named[0][1].device if named else result.loss.device
    present = [result.grads.get(n) is not None for n, _ in named]
    dtype = fold(torch.promote_types, [g.dtype for g in result.grads.values() if g is not None],
                 torch.promote_types(result.loss.dtype, torch.float32))
    count = result.valid_steps.to(device=device, dtype=dtype).reshape(1)
    flat = [(g.to(dtype) if (g := result.grads.get(n)) is not None
             else torch.zeros(p.shape, dtype=dtype, device=device)).reshape(-1) for n, p in named]
    # each mean times its count: summed over ranks, that is the sum over all ranks' valid steps
    weighted = torch.cat(flat + [result.loss.to(device=device, dtype=dtype).reshape(1)]) * count
    buffer = sum_over_ranks(torch.cat([weighted, count, torch.tensor(present, dtype=dtype, device=device)]))
    sizes = [p.numel() for _, p in named]
    size = sum(sizes)
    total = buffer[size + 1]
    mean = buffer[: size + 1] / total.clamp_min(1)
    anywhere = (buffer[size + 2:] > 0).tolist()
    grads: dict[str, Optional[torch.Tensor]] = {}
    for (name, p), g, used in zip(named, torch.split(mean[:size], sizes), anywhere):
        grads[name] = g.view(p.shape) if used else None
    return UpdateResult(result.update, mean[size], grads, total, result.k2, result.params)


def _checksum(t: torch.Tensor) -> torch.Tensor:
    x = t.detach().reshape(-1).double()
    where = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device) / max(x.numel(), 1)
    return torch.stack([x.sum(), (x * x).sum(), (x * where).sum()]).cpu()


def streams_to_cpu(saved: dict) -> dict:
    """A copy of an engine state (``StreamEngine.state_dict``) on the CPU, sharing no storage."""
    # a copy: the open block's steps are views of the whole split, whose storage pickling would carry
    return StreamState.from_dict(saved).map_tensors(lambda x: x.detach().to("cpu", copy=True)).to_dict()


def shard_streams(saved: Any, rank: int, world: int, device: Any = "cpu", where: str = "engine") -> dict:
    """Rank ``rank`` of ``world``'s contiguous share of the rows of an engine state of all rows
    (``StreamEngine.state_dict``; checkpoint field ``where``), its tensors on ``device``."""
    streams = StreamState.from_dict(saved, where)
    rows = streams.batch_size
    if rows is not None and world > 1:
        if rows % world:
            raise ValueError(f"the checkpoint holds {rows} streams, which {world} ranks cannot share evenly; "
                             f"resume on a number of ranks that divides {rows}")
        share = rows // world
        streams = streams.take_rows(rank * share, (rank + 1) * share)
    return streams.to(device).to_dict()


def merge_streams(shares: list[dict], model: torch.nn.Module, reset_fn: Any = st.reset_rows) -> dict:
    """One engine state of all rows from the ranks' engine states (rank order = row order)."""
    return merge_rows([StreamState.from_dict(s) for s in shares], model, reset_fn).to_dict()
