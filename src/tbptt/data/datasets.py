"""Real data, loaded offline: two classic series shipped with the package, and character-level text.

- ``co2``: weekly atmospheric CO2 at Mauna Loa, 1958-2001 (ppm): Keeling & Whorf (2004), Scripps
  Institution of Oceanography, via the Carbon Dioxide Information Analysis Center (U.S. Department
  of Energy); public domain.
- ``sunspots``: yearly sunspot numbers, 1700-2008, from NOAA's National Geophysical Data Center;
  public domain.
- ``text``: any text file, modelled character by character.

Both series are the ones statsmodels distributes (``statsmodels.datasets.co2``, ``.sunspots``),
kept in ``data/series/*.csv`` with their sources in each file's header, so that they load with the
core install alone. Every split is cut by time (the past trains, the future validates and tests),
so no statistic of a later split reaches an earlier one: the scaling is fitted on the training part
alone, and the text vocabulary is built from it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from importlib import resources
from functools import lru_cache, partial
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..validate import positive_ints
from .streams import Split, forecasting_pairs, stateful_streams
from .task import Task, bits_per_symbol, cross_entropy, squared_error

SERIES_FRACTIONS = (0.70, 0.15, 0.15)
TEXT_FRACTIONS = (0.90, 0.05, 0.05)
TEXT_SEGMENT = 500
TEXT_STEPS_PER_RUN = 200_000
"""The text task's suggested run: calls of ``TEXT_SEGMENT`` steps, and about this many steps per row
in all (1 MB of text in 16 rows is 56,250 training steps a row: 4 epochs)."""
UNKNOWN = "\ufffd"
"""The alphabet entry of the token id given to characters never seen in the training text."""


@dataclass(frozen=True)
class StandardScaler:
    """Per-feature standardisation ``(x - mean) / std`` (population std), kept to undo it."""

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, values: Tensor) -> "StandardScaler":
        """The scaler of ``values[T, F]``, ignoring NaN (missing) entries."""
        mean = values.nanmean(0)
        std = (values - mean).pow(2).nanmean(0).sqrt()
        if not bool(torch.all(std > 0)):
            raise ValueError(f"cannot scale a feature that is constant in the training part (std {std.tolist()})")
        return cls(mean, std)

    def transform(self, values: Tensor) -> Tensor:
        """``values`` in standard units."""
        return (values - self.mean) / self.std

    def inverse(self, values: Tensor) -> Tensor:
        """Standard units back to the original ones."""
        return values * self.std + self.mean


def rmse_in_units(scaler: StandardScaler, outputs: Tensor, targets: Tensor, mask: Optional[Tensor] = None) -> float:
    """Root mean squared error over valid steps after undoing the scaling (original units)."""
    scaler64 = StandardScaler(scaler.mean.double(), scaler.std.double())
    errors = (scaler64.inverse(outputs.double()) - scaler64.inverse(targets.double())).pow(2).flatten(2).mean(-1)
    if mask is not None and not bool(mask.any()):
        raise ValueError("the mask has no valid step; a metric needs at least one")
    return math.sqrt(float(errors.mean() if mask is None else errors[mask].mean()))


def load_co2() -> np.ndarray:
    """Weekly Mauna Loa CO2 in ppm from the week ending 29 March 1958, ``[T]`` float64, NaN where a
    week was not measured."""
    return _series("co2_weekly.csv").copy()


def load_sunspots() -> np.ndarray:
    """Yearly sunspot numbers from 1700, ``[T]`` float64."""
    return _series("sunspots_yearly.csv").copy()


def co2_task(
    *, batch_size: int = 4, eval_batch_size: int = 1, horizon: int = 1, difference: bool = True
) -> Task:
    """Forecasting weekly Mauna Loa CO2 ``horizon`` weeks ahead; RMSE in ppm.

    Missing weeks are filled with the last measured value, never a later one (interpolating
    between neighbours would put a future target into the inputs), and are not scored. With
    ``difference`` (the default) the model sees and predicts changes over ``horizon`` weeks: the
    level keeps rising out of the training range, its changes do not.
    """
    what = "changes" if difference else "levels"
    return _forecasting_task(
        "co2", load_co2(), "ppm", batch_size, eval_batch_size, horizon, difference,
        f"weekly Mauna Loa CO2 (ppm), {what} forecast {horizon} week(s) ahead; yearly cycle of 52 steps",
    )


def sunspots_task(
    *, batch_size: int = 4, eval_batch_size: int = 1, horizon: int = 1, difference: bool = False
) -> Task:
    """Forecasting yearly sunspot numbers ``horizon`` years ahead; RMSE in sunspot numbers.
    ``difference``: see and predict changes over ``horizon`` years instead of levels."""
    what = "changes" if difference else "levels"
    return _forecasting_task(
        "sunspots", load_sunspots(), "sunspot number", batch_size, eval_batch_size, horizon, difference,
        f"yearly sunspot numbers, {what} forecast {horizon} year(s) ahead; cycle of about 11 steps",
    )


def text_task(
    *, path: Union[str, os.PathLike, None] = None, batch_size: int = 16, eval_batch_size: int = 1,
    encoding: str = "utf-8",
) -> Task:
    """Character-level language modelling of the text file at ``path``: predict the next character.

    The text is split by position 90/5/5; the alphabet is the training part's characters plus
    ``UNKNOWN`` for any other. Inputs and targets are int64 token ids ``[B, T]``. Metric: bits per
    character. Baseline: the cross-entropy, in bits, of the split's characters under the training
    part's character frequencies (add-one smoothed, so an unseen character costs finite bits).
    """
    if path is None:
        raise ValueError("the text task needs a file: load_task('text', path='corpus.txt')")
    positive_ints(batch_size=batch_size, eval_batch_size=eval_batch_size)
    text = _read_text(path, encoding)
    need = _shortest_text(batch_size, eval_batch_size)
    if len(text) < need:
        raise ValueError(
            f"the text file {str(path)!r} has {len(text)} characters; the text task needs at least {need} (split "
            f"90/5/5 by position into {batch_size} training rows and {eval_batch_size} validation and test rows): "
            "use a longer text or fewer rows (batch_size, eval_batch_size)"
        )
    bounds = _bounds(len(text), TEXT_FRACTIONS)
    alphabet = tuple(sorted(set(text[: bounds[1]]))) + (UNKNOWN,)
    index = {c: i for i, c in enumerate(alphabet[:-1])}
    unknown = len(alphabet) - 1
    ids = torch.tensor([index.get(c, unknown) for c in text], dtype=torch.int64)
    pairs = _pairs_by_time(ids, bounds, 1, f"the text file {str(path)!r} ({len(text)} characters)",
                           (batch_size, eval_batch_size, eval_batch_size))
    train, valid, test = (stateful_streams(x, y, rows) for x, y, _, rows in pairs)

    counts = torch.bincount(ids[: bounds[1]], minlength=len(alphabet)).double() + 1.0
    log_p = (counts / counts.sum()).log()
    baseline = {name: float(-log_p[s.targets][_valid(s)].mean()) / math.log(2)
                for name, s in (("valid", valid), ("test", test))}
    vocab = len(alphabet)
    return Task(
        "text", vocab, vocab, train, valid, test, cross_entropy, "bits per character", False,
        "unigram character frequencies", baseline, dependency=None, vocab=vocab, metric_fn=bits_per_symbol,
        description=f"character-level language model of {Path(path).name} ({len(text)} characters, "
                    f"{vocab} symbols)", alphabet=alphabet,
        # calls of a few hundred steps, so that progress shows and checkpoints can fall inside an epoch;
        # epochs so that a corpus of about a megabyte trains in minutes
        segment_length=min(TEXT_SEGMENT, max(train.steps, valid.steps)),
        epochs=max(1, min(10, round(TEXT_STEPS_PER_RUN / train.steps))),
    )


def _read_text(path: Union[str, os.PathLike], encoding: str) -> str:
    """The file's text; errors name the file (and, for a wrong encoding, the option to change)."""
    try:
        return Path(path).read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"the text file {str(path)!r} is not {encoding} text (byte {exc.object[exc.start]:#04x} at position "
            f"{exc.start}); give its encoding, e.g. encoding=latin-1"
        ) from None
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r} for the text file {str(path)!r}; e.g. utf-8, latin-1") from None


def _shortest_text(batch_size: int, eval_batch_size: int) -> int:
    """The fewest characters whose 90/5/5 split leaves every row of every split a pair to predict."""
    n = 2
    while True:
        _, train, valid, end = _bounds(n, TEXT_FRACTIONS)
        if train - 1 >= batch_size and valid - train >= eval_batch_size and end - valid >= eval_batch_size:
            return n
        n += 1


def _forecasting_task(
    name: str, values: np.ndarray, unit: str, batch_size: int, eval_batch_size: int, horizon: int,
    difference: bool, description: str,
) -> Task:
    """Pairs (x[t], x[t + horizon]) of the series, or of its changes x[t] - x[t - horizon] when
    ``difference``, scaled with the training part's statistics; each split's targets are its own
    steps. The metric and the persistence baseline are in the series' units either way: a change
    forecast's error is the error of the level forecast x[t] + change."""
    positive_ints(batch_size=batch_size, eval_batch_size=eval_batch_size, horizon=horizon)
    if not isinstance(difference, bool):
        raise ValueError(f"difference must be True or False; got {difference!r}")
    raw = torch.tensor(values, dtype=torch.float64).reshape(len(values), -1)
    observed = ~raw.isnan().any(-1)
    filled = _fill_forward(raw)
    # `offset`: the step of the original series that element 0 of `series` belongs to
    offset = horizon if difference else 0
    series = filled[horizon:] - filled[:-horizon] if difference else filled
    series_observed = observed[offset:]
    bounds = tuple(max(b - offset, 0) for b in _bounds(len(raw), SERIES_FRACTIONS))
    train_part = series[: bounds[1]]
    scaler64 = StandardScaler.fit(torch.where(series_observed[: bounds[1], None], train_part, math.nan))
    scaler = StandardScaler(scaler64.mean.float(), scaler64.std.float())
    pairs = _pairs_by_time(scaler64.transform(series).float(), bounds, horizon,
                           f"the {name} series ({len(raw)} steps)", (batch_size, eval_batch_size, eval_batch_size),
                           series_observed)
    train, valid, test = (stateful_streams(x, y, rows, mask=m) for x, y, m, rows in pairs)
    metric = partial(rmse_in_units, scaler)

    def persistence(split: Split) -> Tensor:
        # the forecast of x[t + horizon] is x[t]: the input itself, or a change of zero
        return scaler.transform(torch.zeros_like(split.targets)) if difference else split.inputs

    baseline = {split_name: metric(persistence(s), s.targets, s.mask) for split_name, s in (("valid", valid), ("test", test))}
    return Task(
        name, 1, 1, train, valid, test, squared_error, f"RMSE ({unit})", False, "persistence", baseline,
        dependency=None, vocab=None, metric_fn=metric, description=description, scaler=scaler,
    )


def _bounds(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int, int]:
    """Start of train, valid and test and the end, for ``n`` steps split by ``fractions``."""
    n_train, n_valid = int(n * fractions[0]), int(n * fractions[1])
    return 0, n_train, n_train + n_valid, n


def _pairs_by_time(
    series: Tensor, bounds: tuple[int, int, int, int], horizon: int, what: str, rows: tuple[int, int, int],
    observed: Optional[Tensor] = None,
) -> list[tuple[Tensor, Tensor, Optional[Tensor], int]]:
    """Pairs (x[t], x[t + horizon]) grouped by the split their target falls in, so every target is
    predicted once, from inputs that are all earlier; with each split's row count."""
    inputs, targets = forecasting_pairs(series, horizon)
    out = []
    for i, split_name in enumerate(("train", "valid", "test")):
        # pair t has its target at step t + horizon
        start, stop = max(bounds[i] - horizon, 0), bounds[i + 1] - horizon
        if stop - start < rows[i]:
            raise ValueError(
                f"{what} leaves {max(stop - start, 0)} {split_name} pairs at horizon {horizon}, fewer than its "
                f"{rows[i]} rows; use more data or fewer rows (batch_size / eval_batch_size)"
            )
        mask = None if observed is None else observed[start + horizon : stop + horizon]
        out.append((inputs[start:stop], targets[start:stop], mask, rows[i]))
    return out


def _fill_forward(values: Tensor) -> Tensor:
    """Each missing row replaced by the last observed one (the first observed one before any)."""
    observed = ~values.isnan().any(-1)
    if not bool(observed.any()):
        raise ValueError("the series has no observed value")
    positions = torch.where(observed, torch.arange(len(values)), torch.zeros((), dtype=torch.int64))
    last_seen = torch.cummax(positions, 0).values
    last_seen = torch.where(observed[last_seen], last_seen, torch.nonzero(observed)[0, 0])
    return values[last_seen]


def _valid(split: Split) -> Tensor:
    return split.mask if split.mask is not None else torch.ones(split.inputs.shape[:2], dtype=torch.bool)


@lru_cache(maxsize=None)
def _series(name: str) -> np.ndarray:
    """The second column of ``data/series/NAME`` (a CSV whose ``#`` lines cite its source; an empty
    value is a missing one); callers get copies, so that the cached array stays as read."""
    text = (resources.files(__package__) / "series" / name).read_text(encoding="utf-8")
    rows = [line.split(",") for line in text.splitlines() if line and not line.startswith("#")][1:]
    return np.array([float(value) if value.strip() else math.nan for _, value in rows], dtype=np.float64)
