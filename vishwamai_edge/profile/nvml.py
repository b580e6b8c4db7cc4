"""GPU memory, load and power on CUDA PCs, through NVML (pip: nvidia-ml-py, module pynvml).

Imported lazily: a laptop or a Jetson has no NVML (on Jetson the library may load but
answers NOT_SUPPORTED to memory and power queries), and the profile must run there too.
Each reading that NVML refuses is left out, not faked.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from .stats import summarize


@dataclass
class GpuSample:
    t: float
    index: int
    used_bytes: int | None = None  # the whole device
    total_bytes: int | None = None
    process_bytes: int | None = None  # this process's allocations, where the driver reports them
    util_pct: float | None = None
    power_mw: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception:  # NVMLError_NotSupported and friends: a reading this device lacks
        return None


def read_sample(nvml: Any, handle: Any, index: int, pid: int, t: float) -> GpuSample:
    """One reading of one device. `nvml` is the pynvml module (or a stand-in with its functions)."""
    s = GpuSample(t=t, index=index)
    mem = _try(nvml.nvmlDeviceGetMemoryInfo, handle)
    if mem is not None:
        s.used_bytes, s.total_bytes = int(mem.used), int(mem.total)
    util = _try(nvml.nvmlDeviceGetUtilizationRates, handle)
    if util is not None:
        s.util_pct = float(util.gpu)
    power = _try(nvml.nvmlDeviceGetPowerUsage, handle)  # milliwatts
    if power is not None:
        s.power_mw = float(power)
    procs = _try(nvml.nvmlDeviceGetComputeRunningProcesses, handle)
    if procs is not None:
        mine = [p.usedGpuMemory for p in procs if p.pid == pid and p.usedGpuMemory is not None]
        s.process_bytes = int(sum(mine)) if mine else 0
    return s


def summarize_samples(samples: list[GpuSample]) -> dict[str, Any] | None:
    """Per device: peak and median memory, process memory, load and power."""
    if not samples:
        return None
    out: dict[str, Any] = {"samples": len(samples), "devices": {}}
    for index in sorted({s.index for s in samples}):
        mine = [s for s in samples if s.index == index]
        used = [s.used_bytes for s in mine if s.used_bytes is not None]
        proc = [s.process_bytes for s in mine if s.process_bytes is not None]
        out["devices"][str(index)] = {
            "total_bytes": next((s.total_bytes for s in mine if s.total_bytes), None),
            "peak_used_bytes": max(used) if used else None,
            "baseline_used_bytes": used[0] if used else None,
            "peak_process_bytes": max(proc) if proc else None,
            "util_pct": summarize([s.util_pct for s in mine]),
            "power_mw": summarize([s.power_mw for s in mine]),
        }
    return out


class NvmlMonitor:
    """Polls every visible GPU from a background thread while a bundle is profiled."""

    kind = "nvml"

    def __init__(self, nvml: Any, interval_s: float = 0.1):
        self.nvml = nvml
        self.interval_s = interval_s
        self.samples: list[GpuSample] = []
        self.error: str | None = None
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handles: list[Any] = []

    @classmethod
    def create(cls, interval_s: float = 0.1) -> NvmlMonitor | None:
        """A monitor when NVML is installed, initialises and sees a GPU; else None."""
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception:
            return None
        if count == 0:
            pynvml.nvmlShutdown()
            return None
        return cls(pynvml, interval_s)

    def start(self) -> None:
        n = self.nvml.nvmlDeviceGetCount()
        self._handles = [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        for i, h in enumerate(self._handles):
            name = _try(self.nvml.nvmlDeviceGetName, h)
            self.names[i] = name.decode() if isinstance(name, bytes) else str(name)
        self._t0 = time.perf_counter()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="nvml-poller", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        pid = os.getpid()
        while True:
            t = time.perf_counter() - self._t0
            for i, h in enumerate(self._handles):
                self.samples.append(read_sample(self.nvml, h, i, pid, t))
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass

    def summary(self) -> dict[str, Any] | None:
        out = summarize_samples(self.samples)
        if out is not None:
            out["source"] = self.kind
            for index, name in self.names.items():
                out["devices"].setdefault(str(index), {})["name"] = name
        return out

    def timeline(self) -> list[dict[str, Any]]:
        return [{"t": s.t, "gpu": s.index, "used_bytes": s.used_bytes, "process_bytes": s.process_bytes,
                 "util_pct": s.util_pct, "power_mw": s.power_mw} for s in self.samples]
