"""NVML aggregation with a stand-in module (this machine has no NVIDIA GPU); the real path on a GPU."""

import os
import sys
from types import SimpleNamespace

import pytest

from vishwamai_edge.profile.nvml import GpuSample, NvmlMonitor, read_sample, summarize_samples


class NotSupported(Exception):
    pass


class FakeNvml:
    """The pynvml functions the monitor calls, over scripted device states."""

    def __init__(self, devices):
        self.devices = devices  # list of dicts
        self.calls = 0
        self.shut = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):
        return SimpleNamespace(index=i)

    def nvmlDeviceGetName(self, h):
        return self.devices[h.index]["name"].encode()  # older bindings return bytes

    def nvmlDeviceGetMemoryInfo(self, h):
        d = self.devices[h.index]
        self.calls += 1
        return SimpleNamespace(total=d["total"], used=d["used"], free=d["total"] - d["used"])

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self.devices[h.index]["util"], memory=0)

    def nvmlDeviceGetPowerUsage(self, h):
        p = self.devices[h.index].get("power")
        if p is None:
            raise NotSupported("Not Supported")
        return p

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=pid, usedGpuMemory=b) for pid, b in self.devices[h.index]["procs"]]


def test_read_sample_picks_this_process():
    nvml = FakeNvml([{"name": "RTX", "total": 24e9, "used": 5e9, "util": 87, "power": 250000,
                      "procs": [(111, 1e9), (222, 3e9), (222, 5e8)]}])
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    s = read_sample(nvml, h, 0, pid=222, t=0.5)
    assert s == GpuSample(t=0.5, index=0, used_bytes=5_000_000_000, total_bytes=24_000_000_000,
                          process_bytes=3_500_000_000, util_pct=87.0, power_mw=250000.0)
    assert read_sample(nvml, h, 0, pid=999, t=0).process_bytes == 0


def test_unsupported_readings_are_left_out():
    nvml = FakeNvml([{"name": "Orin (nvgpu)", "total": 8e9, "used": 1e9, "util": 0, "power": None,
                      "procs": []}])
    nvml.nvmlDeviceGetMemoryInfo = lambda h: (_ for _ in ()).throw(NotSupported())
    s = read_sample(nvml, nvml.nvmlDeviceGetHandleByIndex(0), 0, pid=1, t=0)
    assert s.used_bytes is None and s.total_bytes is None and s.power_mw is None
    assert s.util_pct == 0.0


def test_summary_per_device():
    samples = [
        GpuSample(0.0, 0, used_bytes=1000, total_bytes=8000, process_bytes=0, util_pct=0, power_mw=50000),
        GpuSample(0.1, 0, used_bytes=3000, total_bytes=8000, process_bytes=2000, util_pct=90,
                  power_mw=200000),
        GpuSample(0.2, 0, used_bytes=2500, total_bytes=8000, process_bytes=1500, util_pct=60,
                  power_mw=150000),
        GpuSample(0.0, 1, used_bytes=10, total_bytes=100, process_bytes=None, util_pct=None, power_mw=None),
    ]
    s = summarize_samples(samples)
    d0 = s["devices"]["0"]
    assert s["samples"] == 4
    assert d0["total_bytes"] == 8000 and d0["peak_used_bytes"] == 3000 and d0["baseline_used_bytes"] == 1000
    assert d0["peak_process_bytes"] == 2000
    assert d0["util_pct"]["median"] == 60 and d0["power_mw"]["max"] == 200000
    d1 = s["devices"]["1"]
    assert d1["peak_process_bytes"] is None and d1["util_pct"] is None
    assert summarize_samples([]) is None


def test_monitor_polls_and_stops():
    nvml = FakeNvml([{"name": "RTX 4090", "total": 24e9, "used": 2e9, "util": 5, "power": 30000,
                      "procs": [(os.getpid(), 7e8)]}])
    mon = NvmlMonitor(nvml, interval_s=0.01)
    mon.start()
    import time

    deadline = time.time() + 5
    while len(mon.samples) < 3 and time.time() < deadline:
        time.sleep(0.01)
    mon.stop()
    n = len(mon.samples)
    time.sleep(0.05)
    assert len(mon.samples) == n >= 3  # nothing polls after stop
    summary = mon.summary()
    assert summary["source"] == "nvml"
    assert summary["devices"]["0"]["name"] == "RTX 4090"
    assert summary["devices"]["0"]["peak_process_bytes"] == 700_000_000
    assert mon.timeline()[0]["power_mw"] == 30000
    mon.close()
    assert nvml.shut


def test_create_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    assert NvmlMonitor.create() is None


def _has_nvidia_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(not _has_nvidia_gpu(), reason="no NVML-visible NVIDIA GPU")
def test_real_nvml():
    mon = NvmlMonitor.create(interval_s=0.05)
    mon.start()
    import time

    time.sleep(0.3)
    mon.stop()
    mon.close()
    dev = mon.summary()["devices"]["0"]
    assert dev["total_bytes"] > 0 and dev["peak_used_bytes"] > 0
