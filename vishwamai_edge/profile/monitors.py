"""Background samplers: this process's RSS over time, and the device's own readings.

RSS is sampled with psutil from a thread, so it shows memory over time and the peak of
each bundle. `resource.getrusage` adds the kernel's own high-water mark, exact but
process-wide and monotonic: with several bundles in one run it is the largest so far.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol


class DeviceMonitor(Protocol):
    kind: str
    error: str | None

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def summary(self) -> dict[str, Any] | None: ...

    def timeline(self) -> list[dict[str, Any]]: ...


class RssSampler:
    """RSS of this process every `interval_s`, with marks naming what ran when."""

    def __init__(self, interval_s: float = 0.05):
        import psutil

        self._process = psutil.Process()
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self.marks: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._stop.clear()
        self._take()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _take(self) -> None:
        self.samples.append((self.now(), self._process.memory_info().rss))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def mark(self, label: str) -> None:
        self.marks.append((self.now(), label))
        self._take()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._take()

    @property
    def peak_bytes(self) -> int:
        return max(rss for _, rss in self.samples) if self.samples else 0

    def peak_before(self, label: str) -> int:
        """Peak RSS before the first mark named `label` (all samples if there is none)."""
        until = next((t for t, m in self.marks if m == label), None)
        rss = [r for t, r in self.samples if until is None or t < until]
        return max(rss) if rss else 0

    @property
    def baseline_bytes(self) -> int:
        return self.samples[0][1] if self.samples else 0

    def timeline(self, max_points: int = 2000) -> list[list[float]]:
        """[[t, rss], ...], thinned evenly to at most max_points (peak kept) for the report."""
        pts = self.samples
        if len(pts) > max_points:
            step = len(pts) / max_points
            keep = {int(i * step) for i in range(max_points)}
            keep.add(max(range(len(pts)), key=lambda i: pts[i][1]))
            pts = [pts[i] for i in sorted(keep)]
        return [[round(t, 4), rss] for t, rss in pts]


def process_maxrss_bytes() -> int:
    """The kernel's high-water mark of this process's RSS (ru_maxrss: KiB on Linux, bytes on macOS)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def is_jetson(root: Path = Path("/")) -> bool:
    return (root / "etc/nv_tegra_release").exists()


def device_monitor() -> DeviceMonitor | None:
    """NVML on a CUDA PC, jtop or tegrastats on a Jetson, nothing elsewhere."""
    from importlib.util import find_spec

    from .nvml import NvmlMonitor
    from .tegrastats import JtopMonitor, TegrastatsMonitor

    if is_jetson():
        # jtop reads the rails without root; tegrastats shows fewer fields when not root
        if find_spec("jtop") is not None and os.path.exists("/run/jtop.sock"):
            return JtopMonitor()
        if shutil.which("tegrastats") or os.path.exists("/usr/bin/tegrastats"):
            return TegrastatsMonitor()
        return None
    return NvmlMonitor.create()
