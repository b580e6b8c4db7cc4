"""Jetson readings: shared RAM, GPU load and power rails, from tegrastats or jtop.

A Jetson has no NVML and no separate GPU memory: the GPU allocates from the same RAM
as the CPU, so "GPU memory" here is tegrastats' system RAM in use (and jtop's
GPU-mapped "shared" part when jtop is installed). Power comes from the module's INA3221
rails; their names differ per module and JetPack:

  Orin NX / Orin Nano:  VDD_IN (module input), VDD_CPU_GPU_CV, VDD_SOC
  AGX Orin:             VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0, VDDQ_VDD2_1V8AO (no single input rail)

JetPack 5 (L4T 35, kernel 5.10) prints upper-case thermal zones (CPU@47.9C) and
"GR3D_FREQ 0%@611"; JetPack 6 (L4T 36, kernel 5.15) prints lower-case zones (cpu@53.0C),
per-GPC clocks "GR3D_FREQ 0%@[305,305]" and engine states ("NVDEC off"). Rails print
"5299mW/5299mW" (instant/average) on both; older boards print "2532/2698" without units.
The parser keys on field shapes, not positions, so all of these read the same way.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .stats import summarize

_TIMESTAMP = re.compile(r"^(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s+")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB(?:\s*\(lfb (\d+)x(\d+)([kM])B\))?")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB(?:\s*\(cached (\d+)MB\))?")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?![\w/])")
_NOT_RAILS = {"RAM", "SWAP", "IRAM"}
_DISABLED_SENSOR_C = -200.0  # tegrastats prints -256C for a powered-down thermal zone
# Rails that are the whole module's input power, best first; without one, rails are summed.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


@dataclass
class TegraSample:
    t: float  # seconds since the monitor started
    timestamp: str | None = None  # tegrastats' own clock, when it prints one
    ram_used_mb: float | None = None
    ram_total_mb: float | None = None
    ram_shared_mb: float | None = None  # GPU-mapped RAM (jtop only)
    swap_used_mb: float | None = None
    swap_total_mb: float | None = None
    cpu_load_pct: list[float | None] = field(default_factory=list)  # None = core off
    emc_load_pct: float | None = None
    gpu_load_pct: float | None = None
    gpu_freq_mhz: list[int] = field(default_factory=list)
    temps_c: dict[str, float] = field(default_factory=dict)
    rails_mw: dict[str, float] = field(default_factory=dict)  # instantaneous
    rails_avg_mw: dict[str, float] = field(default_factory=dict)  # tegrastats' running average

    @property
    def total_power_mw(self) -> float | None:
        for name in INPUT_RAILS:
            if name in self.rails_mw:
                return self.rails_mw[name]
        rails = [v for k, v in self.rails_mw.items() if k != "NC"]
        return sum(rails) if rails else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_power_mw"] = self.total_power_mw
        return d


def parse_line(line: str, t: float = 0.0) -> TegraSample | None:
    """One tegrastats line -> a sample; None for a line that is not tegrastats output."""
    line = line.strip()
    ram = _RAM.search(line)
    if not ram:
        return None
    s = TegraSample(t=t)
    ts = _TIMESTAMP.match(line)
    if ts:
        s.timestamp = ts.group(1)
    s.ram_used_mb, s.ram_total_mb = float(ram.group(1)), float(ram.group(2))
    swap = _SWAP.search(line)
    if swap:
        s.swap_used_mb, s.swap_total_mb = float(swap.group(1)), float(swap.group(2))
    cpu = _CPU.search(line)
    if cpu:
        for core in cpu.group(1).split(","):
            m = re.match(r"\s*(\d+)%", core)
            s.cpu_load_pct.append(float(m.group(1)) if m else None)
    emc = _EMC.search(line)
    if emc:
        s.emc_load_pct = float(emc.group(1))
    gr3d = _GR3D.search(line)
    if gr3d:
        s.gpu_load_pct = float(gr3d.group(1))
        if gr3d.group(2):
            s.gpu_freq_mhz = [int(x) for x in gr3d.group(2).split(",") if x]
    for name, value in _TEMP.findall(line):
        if float(value) > _DISABLED_SENSOR_C:
            s.temps_c[name] = float(value)
    for name, inst, avg in _RAIL.findall(line):
        if name not in _NOT_RAILS:
            s.rails_mw[name] = float(inst)
            s.rails_avg_mw[name] = float(avg)
    return s


def parse_lines(text: str) -> list[TegraSample]:
    out = []
    for i, line in enumerate(text.splitlines()):
        s = parse_line(line, t=float(i))
        if s is not None:
            out.append(s)
    return out


def summarize_samples(samples: list[TegraSample]) -> dict[str, Any] | None:
    """Peak and median RAM, GPU load and power over a run; None without samples."""
    if not samples:
        return None
    rails = sorted({name for s in samples for name in s.rails_mw})
    has_input = any(name in rails for name in INPUT_RAILS)
    ram_total = next((s.ram_total_mb for s in samples if s.ram_total_mb), None)
    return {
        "samples": len(samples),
        "ram_total_mb": ram_total,
        "ram_used_mb": summarize([s.ram_used_mb for s in samples]),
        "ram_shared_mb": summarize([s.ram_shared_mb for s in samples]),
        "swap_used_mb": summarize([s.swap_used_mb for s in samples]),
        "gpu_load_pct": summarize([s.gpu_load_pct for s in samples]),
        "emc_load_pct": summarize([s.emc_load_pct for s in samples]),
        "total_power_mw": summarize([s.total_power_mw for s in samples]),
        "total_power_source": next((n for n in INPUT_RAILS if n in rails), None)
        if has_input else ("sum of rails" if rails else None),
        "rails_mw": {name: summarize([s.rails_mw.get(name) for s in samples]) for name in rails},
        "temps_c_max": {
            name: max(s.temps_c[name] for s in samples if name in s.temps_c)
            for name in sorted({n for s in samples for n in s.temps_c})
        },
    }


# ---------------------------------------------------------------------------------------------
# jtop (jetson-stats): the same sample from its Python API
# ---------------------------------------------------------------------------------------------


def sample_from_jtop(memory: dict, power: dict, gpu: dict, t: float = 0.0) -> TegraSample:
    """jtop's memory / power / gpu dicts (memory in kB, power in mW) -> a sample."""
    s = TegraSample(t=t)
    ram = memory.get("RAM") or {}
    if "used" in ram:
        s.ram_used_mb = ram["used"] / 1024
    if "tot" in ram:
        s.ram_total_mb = ram["tot"] / 1024
    if "shared" in ram:
        s.ram_shared_mb = ram["shared"] / 1024
    swap = memory.get("SWAP") or {}
    if "used" in swap:
        s.swap_used_mb = swap["used"] / 1024
    if "tot" in swap:
        s.swap_total_mb = swap["tot"] / 1024
    for name, rail in (power.get("rail") or {}).items():
        if isinstance(rail, dict) and "power" in rail:
            s.rails_mw[name] = float(rail["power"])
            s.rails_avg_mw[name] = float(rail.get("avg", rail["power"]))
    for info in gpu.values():
        load = (info.get("status") or {}).get("load") if isinstance(info, dict) else None
        if load is not None:
            s.gpu_load_pct = float(load)
            break
    return s


# ---------------------------------------------------------------------------------------------
# Monitors: background samplers started and stopped around one bundle's profile
# ---------------------------------------------------------------------------------------------


class TegrastatsMonitor:
    """Runs `tegrastats --interval MS` (this process's own child) and parses its lines."""

    kind = "tegrastats"

    def __init__(self, interval_ms: int = 250, executable: str | None = None):
        self.interval_ms = interval_ms
        self.executable = executable or shutil.which("tegrastats") or "/usr/bin/tegrastats"
        self.samples: list[TegraSample] = []
        self.error: str | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()
        try:
            self._proc = subprocess.Popen(
                [self.executable, "--interval", str(self.interval_ms)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
        except OSError as exc:
            self.error = f"cannot start tegrastats: {exc}"
            return
        self._thread = threading.Thread(target=self._read, name="tegrastats-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            s = parse_line(line, t=time.perf_counter() - self._t0)
            if s is not None:
                self.samples.append(s)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # our own child only
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self) -> dict[str, Any] | None:
        out = summarize_samples(self.samples)
        if out is not None:
            out["source"] = self.kind
        return out

    def timeline(self) -> list[dict[str, Any]]:
        return [{"t": s.t, "ram_used_mb": s.ram_used_mb, "gpu_load_pct": s.gpu_load_pct,
                 "total_power_mw": s.total_power_mw} for s in self.samples]


class JtopMonitor(TegrastatsMonitor):
    """The same readings through jetson-stats' jtop service (no root needed for the rails)."""

    kind = "jtop"

    def __init__(self, interval_ms: int = 250):
        super().__init__(interval_ms)
        self._running = threading.Event()

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._running.set()
        self._thread = threading.Thread(target=self._poll, name="jtop-reader", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        try:
            from jtop import jtop

            with jtop(interval=self.interval_ms / 1000) as jetson:
                while self._running.is_set() and jetson.ok():
                    t = time.perf_counter() - self._t0
                    self.samples.append(sample_from_jtop(jetson.memory, jetson.power, jetson.gpu, t))
        except Exception as exc:  # the jtop service not running, an API change: no Jetson readings
            self.error = f"jtop: {type(exc).__name__}: {exc}"

    def stop(self) -> None:
        self._running.clear()
        if self._thread is not None:
            self._thread.join(timeout=5)
