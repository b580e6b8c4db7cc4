"""Medians and spread of repeated measurements.

Timings on a shared machine have outliers in one direction (a run that lost the CPU),
so reports lead with the median and show the interquartile range, not mean +/- stdev.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def summarize(values: Sequence[float | None]) -> dict[str, Any] | None:
    """median, q1, q3, min, max, sample stdev and n of the values that are not None."""
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return None
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
    return {
        "median": median(xs),
        "q1": percentile(xs, 25.0),
        "q3": percentile(xs, 75.0),
        "min": min(xs),
        "max": max(xs),
        "stdev": math.sqrt(var),
        "n": len(xs),
    }
