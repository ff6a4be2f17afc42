"""One run of a sweep: a task, a configuration and a seed, trained with ``Trainer.fit``.

``run_one(spec)`` never raises for a run that goes wrong: a non-finite loss makes the run
"diverged", an exception makes it "failed" with the error, and the sweep carries on.
"""

from __future__ import annotations

import math
import random
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from ..budget import Budget
from ..data import load_task
from ..diagnostics import grad_norm_summary, gradient_vs_lag, roughness
from ..engine import STRATEGIES
from ..models import MODELS, model_spec
from ..precision import PRECISIONS, autocast_for
from ..schedules import SCHEDULE_OPTIONS, Schedule, nominal_k2, parse_schedule, window_kind
from ..trainer import Trainer
from ..validate import (
    InvalidArgument,
    InvalidArgumentType,
    non_negative_int,
    one_of,
    positive_int,
    positive_number,
)
from .memory import GraphMemory

KEEP_UPDATES = 2000
"""Per-update records kept in a run's result (evenly thinned beyond this)."""

MODEL_NAMES: tuple[str, ...] = tuple(MODELS)
"""The built-in models a run may name (``"path/to/file.py:factory"`` names a user's own)."""

_OVERRIDES = {"lr": float, "clip": float, "strategy": str, "model": str}
CONFIG_FORM = ("K1,K2[@key=value,...] with K1 and K2 positive ints or n (the whole stream), or artbp:K1,MEAN_K2 or "
               "adaptive:K1, and keys lr, clip, strategy, model (and, for adaptive:K1, tolerance, min_k2, max_k2, "
               "every), e.g. 10,40 or n,n or 20,20@lr=0.1 or 10,40@model=lru or artbp:10,30 or "
               "adaptive:10@tolerance=0.05")
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass(frozen=True)
class Configuration:
    """A schedule with optional per-configuration overrides, written ``"SCHEDULE[@key=value,...]"``
    (keys: lr, clip, strategy, model; and, for an adaptive schedule, tolerance, min_k2, max_k2,
    every), e.g. ``"10,40"``, ``"n,n"``, ``"20,20@lr=1e3"``, ``"5,20@strategy=stored"``,
    ``"10,40@model=lru"``, ``"5,5@model=my_model.py:factory"``, ``"artbp:10,30"``,
    ``"adaptive:10@tolerance=0.05"`` (the schedule as ``tbptt.parse_schedule`` reads it)."""

    schedule: Schedule
    lr: Optional[float] = None
    clip: Optional[float] = None
    strategy: Optional[str] = None
    model: Optional[str] = None

    def __post_init__(self) -> None:
        if self.strategy is not None:
            one_of(self.strategy, "strategy", STRATEGIES)
        if self.model is not None:
            model_spec(self.model, "model")
        for name in ("lr", "clip"):
            positive_number(getattr(self, name), name, none="the sweep's setting")

    @classmethod
    def parse(cls, text: str) -> "Configuration":
        """Read ``"SCHEDULE[@key=value,...]"``; an ``InvalidArgument`` named ``config`` if it is not one.

        The one place a configuration's text is read (``compare``, ``tbptt train``, ``probe``, ``demo``);
        the schedule itself through ``tbptt.parse_schedule``."""
        if not isinstance(text, str):
            raise InvalidArgumentType("config", text, CONFIG_FORM)
        body, _, extra = text.partition("@")
        options: dict[str, Any] = {}
        scheduling: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in extra.split(","))):
            key, sep, value = item.partition("=")
            if sep and key in SCHEDULE_OPTIONS:
                scheduling[key] = value
                continue
            if not sep or key not in _OVERRIDES:
                raise InvalidArgument("config", text, CONFIG_FORM,
                                      f"bad override {item!r}: keys are {', '.join(sorted(_OVERRIDES))} (and, for "
                                      f"adaptive:K1, {', '.join(SCHEDULE_OPTIONS)})")
            try:
                options[key] = _OVERRIDES[key](value)
            except ValueError:
                raise InvalidArgument("config", text, CONFIG_FORM, f"bad value for {key}: {value!r}") from None
        try:
            schedule = parse_schedule(body, scheduling)
        except ValueError as exc:  # InvalidArgument too: a value that is not right (k1 = 0) says which
            generic = str(exc).startswith("expected a configuration like")
            raise InvalidArgument("config", text, CONFIG_FORM, "" if generic else str(exc)) from None
        try:
            return cls(schedule, **options)
        except InvalidArgument as error:  # say where: a flag of the same name may hold another value
            raise error.renamed(f"{error.name} (in configuration {text!r})") from None

    def __str__(self) -> str:
        """``"TBPTT(5,20) lr=0.1 strategy=stored"``; a model override as its bare name: ``"TBPTT(5,5) lru"``."""
        extras = [f"{k}={getattr(self, k):g}" if k in ("lr", "clip") else f"{k}={getattr(self, k)}"
                  for k in ("lr", "clip", "strategy") if getattr(self, k) is not None]
        return " ".join([str(self.schedule)] + extras + ([self.model] if self.model else []))


def with_model(config: str, model: str) -> str:
    """The configuration string ``config`` with ``@model=MODEL`` written into it, unless it names
    its own model: ``with_model("5,5", "lstm") == "5,5@model=lstm"``."""
    if Configuration.parse(config).model is not None:
        return config
    return f"{config}{',' if '@' in config else '@'}model={model}"


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs; picklable, so it can cross to a worker process.

    ``seed`` seeds the model's initialisation (and any randomness in training); the task's data
    are the same for every seed (``task_options`` fixes them). ``threads``: torch's intra-op
    threads for the run (one by default: a small recurrent model's steps are too small to share,
    and more threads only contend; benchmarks/README.md, "Threads").
    """

    task: str
    config: str
    seed: int = 0
    strategy: str = "recompute"
    epochs: Optional[int] = 10
    hidden: int = 32
    model: str = "lstm"
    lr: float = 1e-2
    optimizer: str = "adam"
    clip: Optional[float] = 1.0
    segment_length: Optional[int] = None
    max_seconds: Optional[float] = None
    task_options: tuple[tuple[str, Any], ...] = field(default=())
    index: int = 0
    budget: Optional[str] = None
    probe_lags: Optional[int] = None
    threads: int = 1
    precision: str = "fp32"

    def __post_init__(self) -> None:
        Configuration.parse(self.config)  # a bad configuration string fails here, with its message
        one_of(self.strategy, "strategy", STRATEGIES)
        one_of(self.precision, "precision", PRECISIONS)
        positive_int(self.epochs, "epochs", none="until the budget runs out")
        if self.budget is not None:
            object.__setattr__(self, "budget", str(Budget.parse(self.budget)))
        elif self.epochs is None:
            raise InvalidArgument("epochs", None, "a positive int when there is no budget", mentions=("budget",))
        positive_int(self.probe_lags, "probe_lags", "lags the trained model is probed at", "no probe")
        non_negative_int(self.seed, "seed")
        one_of(self.optimizer, "optimizer", tuple(OPTIMIZERS))
        positive_number(self.lr, "lr")
        positive_int(self.hidden, "hidden", "hidden units")
        model_spec(self.model, "model")
        positive_number(self.clip, "clip", none="no clipping; 0 on the command line")
        positive_int(self.segment_length, "segment_length", "steps per train_on call", "the whole split")
        positive_number(self.max_seconds, "max_seconds", "seconds", "no time budget")
        positive_int(self.threads, "threads", "torch threads")

    @property
    def configuration(self) -> Configuration:
        return Configuration.parse(self.config)

    def settings(self) -> dict[str, Any]:
        """The effective settings: the configuration's overrides over the sweep's defaults."""
        c = self.configuration
        return {
            "schedule": c.schedule,
            "lr": c.lr if c.lr is not None else self.lr,
            "clip": c.clip if c.clip is not None else self.clip,
            "strategy": c.strategy or self.strategy,
            "model": c.model or self.model,
        }


def model_for(task: Any, model: str, hidden: int) -> Any:
    """``task.model(hidden, name=model)``. A user's file that cannot be imported, or a factory that
    fails or returns no model, is a ValueError that names the file and the function."""
    try:
        return task.model(hidden=hidden, name=model)
    except InvalidArgument as error:
        raise (error.renamed("model") if error.name in ("spec", "name") else error) from None
    except (ImportError, TypeError, RuntimeError) as error:  # raised by a user's file, which they name
        raise ValueError(str(error)) from error


def check_models(specs: Sequence[RunSpec]) -> None:
    """Build, once each, the users' models the runs name (``path/to/file.py:factory``), so that a file
    that cannot be imported or a factory that returns the wrong thing fails now (``model_for``'s
    ValueError), rather than in every run; and, under a precision other than fp32, every model, so
    that one that cannot run at it fails now (``InvalidArgument`` naming ``precision``)."""
    files = {}
    for spec in specs:
        files.setdefault((spec.settings()["model"], spec.precision), spec)
    task = None
    for (model, precision), spec in files.items():
        if model not in MODELS or precision != "fp32":
            task = task or load_task(spec.task, **dict(spec.task_options))
            autocast_for(model_for(task, model, spec.hidden), precision)


def _thin(values: list, keep: int) -> tuple[list, list[int]]:
    """At most ``keep`` evenly spaced values and their 1-based positions."""
    if len(values) <= keep:
        return values, list(range(1, len(values) + 1))
    index = sorted({round(i * (len(values) - 1) / (keep - 1)) for i in range(keep)})
    return [values[i] for i in index], [i + 1 for i in index]


class _ProgressEvents:
    """A ``fit`` callback that reports to ``emit`` where the run stands, ``("progress", index,
    {"epoch", "loss", "done", "left"})`` with ``done`` the share of its budget spent (0 to 1) and
    ``left`` what remains of it: at each epoch's end and at most every ``every`` seconds between."""

    def __init__(self, emit: Callable[[tuple], None], index: int, steps: int, every: float = 0.5) -> None:
        self.emit, self.index, self.steps, self.every = emit, index, steps, every
        self.epoch, self.loss, self.last = 0, math.nan, time.perf_counter()

    def _report(self, trainer) -> None:
        meter = trainer.budget
        epochs = self.epoch + trainer.position / max(self.steps, 1)
        done = meter.fraction(epochs) if meter is not None else 0.0
        left = meter.left() if meter is not None else ""
        self.emit(("progress", self.index, {"epoch": self.epoch + 1, "loss": self.loss, "done": done, "left": left}))
        self.last = time.perf_counter()

    def on_update(self, trainer, record) -> None:
        if not record.skipped:
            self.loss = record.loss
        if time.perf_counter() - self.last >= self.every:
            self._report(trainer)

    def on_epoch_end(self, trainer, info: dict) -> None:
        if not info.get("partial"):
            self.epoch = info["epoch"]
        self._report(trainer)


class _EpochClock:
    """A ``fit`` callback that notes the process's CPU seconds at the end of each epoch (its
    validation included), counted from ``started``."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.seconds: list[float] = []

    def on_epoch_end(self, trainer, info: dict) -> None:
        self.seconds.append(time.process_time() - self.started)


def _best(values: list[float], higher_is_better: bool) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan
    return max(finite) if higher_is_better else min(finite)


_WARM = False


def warm_up() -> None:
    """Pay, once per process, the one-off cost that would land in the first run's time: the lazy
    import torch makes on the first optimizer it builds."""
    global _WARM
    if not _WARM:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])
        _WARM = True


def failed_run(spec: RunSpec, error: str, started: Optional[float] = None) -> dict[str, Any]:
    """The result of a run that could not finish, with its error."""
    settings = spec.settings()
    schedule = settings["schedule"]
    return {
        "task": spec.task, "config": str(spec.configuration), "strategy": settings["strategy"],
        "k1": schedule.k1, "k2": nominal_k2(schedule), "windows": window_kind(schedule), "model": settings["model"],
        "seed": spec.seed, "index": spec.index, "lr": settings["lr"], "clip": settings["clip"],
        "budget": spec.budget or f"epochs:{spec.epochs}", "status": "failed", "error": error,
        "wall_time": math.nan if started is None else time.perf_counter() - started,
    }


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)``; the count before it is restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(positive_int(count, "threads", "torch threads"))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_one(spec: RunSpec, emit: Optional[Callable[[tuple], None]] = None) -> dict[str, Any]:
    """Train one model under one configuration and seed; the run's JSON-able result.

    The run uses ``spec.threads`` torch threads (restored afterwards), in this process as in a
    sweep's worker processes; the result's ``threads`` is the count it ran with.
    """
    with torch_threads(spec.threads):
        return {**_run(spec, emit), "threads": torch.get_num_threads()}


def _run(spec: RunSpec, emit: Optional[Callable[[tuple], None]]) -> dict[str, Any]:
    warm_up()
    started = time.perf_counter()
    try:
        task = load_task(spec.task, **dict(spec.task_options))
        started = time.perf_counter()  # the run's time, not loading the data
        trained = _train(spec, task, emit)
    except Exception as exc:  # a broken run is reported, never allowed to end the sweep
        result = failed_run(spec, f"{type(exc).__name__}: {exc}", started)
        result["traceback"] = traceback.format_exc(limit=8)
        return result
    result = failed_run(spec, "", started)
    result.update(_outcome(task, trained, started))
    return result


@dataclass
class _Trained:
    trainer: Any
    history: Any
    meter: GraphMemory
    clock: "_EpochClock"
    cpu_started: float
    lag_norms: Optional[list[float]] = None


def _train(spec: RunSpec, task: Any, emit: Optional[Callable[[tuple], None]]) -> _Trained:
    settings = spec.settings()
    cpu_started = time.process_time()
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    model = model_for(task, settings["model"], spec.hidden)
    optimizer = OPTIMIZERS[spec.optimizer](model.parameters(), lr=settings["lr"])
    trainer = Trainer(model, task.loss_fn, optimizer, settings["schedule"], strategy=settings["strategy"],
                      clip_grad_norm=settings["clip"], precision=spec.precision)
    meter = GraphMemory()
    clock = _EpochClock(cpu_started)
    callbacks = [clock] + ([_ProgressEvents(emit, spec.index, task.train.steps)] if emit is not None else [])
    with meter.hooks():
        # keep_updates: the report plots every update's gradient norm and loss (thinned below)
        history = trainer.fit(task.train, epochs=spec.epochs, valid=task.valid, metric=task.metric,
                              segment_length=spec.segment_length, callbacks=callbacks, progress=False,
                              max_seconds=spec.max_seconds, budget=spec.budget, keep_updates=True)
    lags = None if spec.probe_lags is None else _probe(model, task, spec.probe_lags)
    return _Trained(trainer, history, meter, clock, cpu_started, lags)


def _probe(model: Any, task: Any, max_lag: int) -> Optional[list[float]]:
    """The trained model's mean gradient norm per lag (``gradient_vs_lag``) on a few validation
    streams; None when the validation streams are too short or the model's state cannot be probed."""
    split = task.valid
    lags = min(max_lag, split.steps - 1)
    if lags < 2:
        return None
    rows = slice(0, min(8, split.batch_size))
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    try:
        profile = gradient_vs_lag(model, split.inputs[rows], targets=split.targets[rows], loss_fn=task.loss_fn,
                                  max_lag=lags, positions=16, mask=pick(split.mask), resets=pick(split.resets))
    except ValueError:  # e.g. a mask that leaves no step to probe
        return None
    return profile.norms


def _outcome(task: Any, run: _Trained, started: float) -> dict[str, Any]:
    """What a finished run reports: skill, stability and speed."""
    history, trainer = run.history, run.trainer
    epochs = [{**e, "cpu_elapsed": seconds} for e, seconds in zip(history.epochs, run.clock.seconds)]
    metrics = [e.get("valid_metric", math.nan) for e in epochs]
    # an update skipped with a finite norm had no gradient to speak of (no valid steps): no point
    norms = [math.nan if r.skipped and math.isfinite(r.grad_norm) else r.grad_norm for r in history.updates]
    train_time = sum(r.wall_time for r in history.updates)
    # stream steps trained: whole epochs, and the open one's up to its last update when a budget stopped it
    complete = sum(not e.get("partial") for e in history.epochs)
    steps = task.train.steps * complete + trainer.engine.previous
    last = epochs[-1] if epochs else {}
    diverged = history.diverged or (bool(epochs) and not math.isfinite(last.get("valid_loss", math.nan)))
    kept_norms, index = _thin(norms, KEEP_UPDATES)
    k2s = [r.k2 for r in history.updates]
    windows = {} if len({k for k in k2s if k is not None}) <= 1 else {"k2": round(_mean_window(k2s))}
    return dict(
        # a schedule that varied its windows (ARTBP, AdaptiveTBPTT) is named by their mean once trained
        **windows,
        status="diverged" if diverged else "ok",
        metric_name=task.metric_name, higher_is_better=task.higher_is_better, baseline=task.baseline["valid"],
        epochs=epochs,
        final_metric=metrics[-1] if metrics else math.nan,
        best_metric=_best(metrics, task.higher_is_better),
        final_valid_loss=last.get("valid_loss", math.nan),
        wall_time=time.perf_counter() - started,
        # CPU seconds of this process: on a shared machine, a steadier measure than wall time
        cpu_time=time.process_time() - run.cpu_started,
        train_time=train_time,
        # CPU seconds inside the updates (validation apart): what a cpu budget counts
        train_cpu=last.get("train_cpu", math.nan),
        steps=steps,
        steps_per_s=steps / train_time if train_time > 0 else math.nan,
        updates=len(history.updates),
        skipped=sum(r.skipped for r in history.updates),
        forward_steps=trainer.engine.forward_steps,
        backward_steps=trainer.engine.backward_steps,
        peak_graph_mb=run.meter.peak / 2**20,
        # per-update training losses are not comparable across schedules (one step's error for
        # TBPTT(1,n), a stream's mean for TBPTT(n,n)); the validation loss per epoch is
        roughness=roughness([e.get("valid_loss", math.nan) for e in epochs]),
        stopped_by=history.stopped_by,
        grad_norms=kept_norms,
        update_losses=_thin([r.loss for r in history.updates], KEEP_UPDATES)[0],
        update_index=index,
        # the window each update was given (k2 in force, or ARTBP's L drawn), on the same updates
        update_k2=[k2s[i - 1] for i in index],
        mean_k2=_mean_window(k2s),
        # AdaptiveTBPTT's measurements: CPU seconds and steps run (forward and backward) to measure
        measure_time=trainer.engine.measure_seconds,
        measure_steps=trainer.engine.measure_steps,
        lag_norms=run.lag_norms,
        **grad_norm_summary(norms),
    )


def _mean_window(k2s: list) -> float:
    """The mean window over the updates (NaN when the windows were the whole stream so far)."""
    known = [k for k in k2s if k is not None]
    return sum(known) / len(known) if known else math.nan


def estimated_cost(spec: RunSpec, steps: int) -> float:
    """A rough relative cost of a run on streams of ``steps`` steps, to start the longest runs first."""
    settings = spec.settings()
    if spec.epochs is None:  # until a budget runs out: every run costs about that budget
        return 1.0
    cost = settings["schedule"].cost(steps)
    forward = cost["forward_stored"] if settings["strategy"] == "stored" else cost["forward_recompute"]
    # an update's fixed overhead (optimizer step, bookkeeping) is worth some tens of steps
    return spec.epochs * (forward + 2 * cost["backward"] + 40 * cost["updates"])


def spec_dict(spec: RunSpec) -> dict[str, Any]:
    """The spec as plain data, for the report's settings."""
    return asdict(spec)
