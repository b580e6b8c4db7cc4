"""Shared by the benchmark scripts: wall-clock timing after a warm-up."""

from __future__ import annotations

import time
from collections.abc import Callable


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    """Seconds of each of `runs` calls of `fn`, after one unmeasured call (first-run allocations and
    ONNX Runtime's lazy initialisation)."""
    fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out
