"""How fast a curve of gradient norms against lag decays: a geometric fit.

Pure Python, no torch. The lag probe (``tbptt.diagnostics``) and the adaptive schedule
(``tbptt.adaptive``) both read a curve of ||d l / d s_{t-tau}|| against tau through this fit.
"""

from __future__ import annotations

import math
from typing import Sequence


def check_curve(norms: Sequence[float]) -> list[float]:
    """``norms`` as floats, refused when empty, non-finite or negative."""
    values = [float(v) for v in norms]
    if not values:
        raise ValueError("the lag curve is empty; measure at least one lag (max_lag >= 1)")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"lag norms must be finite and non-negative; got {values}")
    return values


def geometric_rate(norms: Sequence[float]) -> float:
    """The ratio of one point's value to the previous one in a geometric fit of ``norms`` (points
    equally spaced): exp of the least-squares slope of log(norm) against the point's index (1.0 for
    a single point; zero norms count as 1e-300)."""
    values = check_curve(norms)
    if len(values) < 2:
        return 1.0
    logs = [math.log(max(v, 1e-300)) for v in values]
    n = len(logs)
    mean_x, mean_y = (n + 1) / 2, sum(logs) / n
    sxx = sum((i + 1 - mean_x) ** 2 for i in range(n))
    sxy = sum((i + 1 - mean_x) * (y - mean_y) for i, y in enumerate(logs))
    return math.exp(sxy / sxx)
