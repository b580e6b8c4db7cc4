"""tegrastats / jtop readings on recorded lines of JetPack 5 and 6 Orin modules (tests/data/tegrastats)."""

import os
import stat
import time
from pathlib import Path

import pytest

from vishwamai_edge.profile.tegrastats import (
    TegrastatsMonitor,
    parse_line,
    parse_lines,
    sample_from_jtop,
    summarize_samples,
)

DATA = Path(__file__).parents[1] / "data" / "tegrastats"


def line(name: str) -> str:
    return (DATA / name).read_text().splitlines()[0]


def test_orin_nx_jetpack5():
    s = parse_line(line("orin-nx-16-jp5.log"))
    assert (s.ram_used_mb, s.ram_total_mb) == (6334, 15388)
    assert (s.swap_used_mb, s.swap_total_mb) == (491, 7694)
    assert s.cpu_load_pct == [6, 9, 5, 16, None, None, None, None]  # four cores "off"
    assert s.emc_load_pct == 0
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (0, [611])
    assert s.rails_mw == {"VDD_IN": 5299, "VDD_CPU_GPU_CV": 773, "VDD_SOC": 1424}
    assert s.rails_avg_mw["VDD_IN"] == 5299
    assert s.total_power_mw == 5299  # VDD_IN is the module's input: not summed with its parts
    assert s.temps_c["CPU"] == 47.937 and s.temps_c["tj"] == 48.875
    assert s.timestamp is None


def test_agx_orin_jetpack5_with_timestamp_and_disabled_sensors():
    s = parse_line(line("agx-orin-64-jp5.log"))
    assert s.timestamp == "04-11-2025 10:36:27"
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_used_mb) == (4321, 62801, 19)
    assert len(s.cpu_load_pct) == 12
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (0, [0, 0])
    assert "CV0" not in s.temps_c and "GPU" not in s.temps_c  # -256C = zone powered down
    assert s.temps_c["Tboard"] == 32 and s.temps_c["tj"] == 44.343
    assert s.rails_mw == {"VDD_GPU_SOC": 2340, "VDD_CPU_CV": 390, "VIN_SYS_5V0": 4025, "NC": 0,
                          "VDDQ_VDD2_1V8AO": 301}
    assert s.total_power_mw == 2340 + 390 + 4025 + 301  # AGX Orin: no input rail, unconnected NC left out


def test_agx_orin_jetpack6_irregular_spacing():
    s = parse_line(line("agx-orin-32-jp6.log"))
    assert (s.ram_used_mb, s.ram_total_mb) == (29114, 30697)
    assert (s.swap_used_mb, s.swap_total_mb) == (4915, 15348)
    assert s.cpu_load_pct[5] == 100 and len(s.cpu_load_pct) == 12
    assert (s.emc_load_pct, s.gpu_load_pct, s.gpu_freq_mhz) == (1, 0, [305, 305])
    assert s.temps_c == {"cpu": 53.062, "soc2": 48.25, "soc0": 48.843, "gpu": 47.812, "tj": 53.062,
                         "soc1": 48.968}
    assert s.rails_mw == {"VDD_GPU_SOC": 3205, "VDD_CPU_CV": 4405, "VIN_SYS_5V0": 4767}
    assert s.total_power_mw == 3205 + 4405 + 4767


def test_agx_orin_jetpack6_without_emc_or_gpu_clock():
    s = parse_line(line("agx-orin-64-jp6.log"))
    assert (s.ram_used_mb, s.ram_total_mb) == (2448, 62840)
    assert s.emc_load_pct is None
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (0, [])
    assert s.rails_mw == {"VDD_GPU_SOC": 4940, "VDD_CPU_CV": 988, "VIN_SYS_5V0": 4442}


def test_units_less_rails_of_older_boards():
    # the unit-less "inst/avg" form, as in NVIDIA's L4T 32 tegrastats documentation
    s = parse_line("RAM 1179/3983MB (lfb 120x4MB) CPU [1%@102,4%@102] EMC_FREQ 7%@408 GR3D_FREQ 0%@76 "
                   "VDD_IN 2532/2698 VDD_CPU 76/178 VDD_GPU 19/19")
    assert s.rails_mw == {"VDD_IN": 2532, "VDD_CPU": 76, "VDD_GPU": 19}
    assert s.rails_avg_mw["VDD_IN"] == 2698
    assert s.total_power_mw == 2532


def test_non_tegrastats_lines_are_ignored():
    assert parse_line("") is None
    assert parse_line("tegrastats: permission denied") is None
    text = "\n".join([line("orin-nx-16-jp5.log"), "garbage", line("orin-nx-16-jp5.log")])
    assert len(parse_lines(text)) == 2


def _varied(base: str, ram: int, gpu: int, vin: int) -> str:
    """A recorded line with three readings changed: a run's worth of distinct samples."""
    return (base.replace("RAM 6334/", f"RAM {ram}/").replace("GR3D_FREQ 0%", f"GR3D_FREQ {gpu}%")
            .replace("VDD_IN 5299mW/5299mW", f"VDD_IN {vin}mW/5299mW"))


def test_summary_over_a_run():
    base = line("orin-nx-16-jp5.log")
    samples = parse_lines("\n".join([_varied(base, 6334, 0, 5299), _varied(base, 7000, 90, 9000),
                                     _varied(base, 7400, 99, 11000), _varied(base, 6500, 10, 6000)]))
    s = summarize_samples(samples)
    assert s["samples"] == 4
    assert s["ram_total_mb"] == 15388
    assert s["ram_used_mb"]["max"] == 7400 and s["ram_used_mb"]["median"] == 6750
    assert s["gpu_load_pct"]["median"] == 50 and s["gpu_load_pct"]["max"] == 99
    assert s["total_power_source"] == "VDD_IN"
    assert s["total_power_mw"]["max"] == 11000 and s["total_power_mw"]["median"] == 7500
    assert s["rails_mw"]["VDD_SOC"]["median"] == 1424
    assert s["temps_c_max"]["CPU"] == 47.937
    assert summarize_samples([]) is None


def test_agx_summary_sums_rails():
    s = summarize_samples(parse_lines(line("agx-orin-32-jp6.log")))
    assert s["total_power_source"] == "sum of rails"
    assert s["total_power_mw"]["median"] == 3205 + 4405 + 4767


def test_jtop_readings():
    # jtop's dicts: memory in kB, power in mW (jetson_stats jtop/core/memory.py, power.py)
    memory = {"RAM": {"tot": 15758336, "used": 6486016, "shared": 1048576, "free": 1, "lfb": 3},
              "SWAP": {"tot": 7878656, "used": 502784, "cached": 0}}
    power = {"rail": {"VDD_IN": {"volt": 5000, "curr": 1060, "power": 5299, "avg": 5100},
                      "VDD_CPU_GPU_CV": {"power": 773, "avg": 700}},
             "tot": {"power": 5299, "avg": 5100, "name": "VDD_IN"}}
    gpu = {"gpu": {"type": "integrated", "status": {"load": 42.5, "railgate": False}}}
    s = sample_from_jtop(memory, power, gpu, t=1.5)
    assert s.ram_used_mb == 6334 and s.ram_total_mb == 15389 and s.ram_shared_mb == 1024
    assert s.swap_used_mb == 491
    assert s.gpu_load_pct == 42.5
    assert s.rails_mw == {"VDD_IN": 5299, "VDD_CPU_GPU_CV": 773}
    assert s.rails_avg_mw["VDD_IN"] == 5100
    assert s.total_power_mw == 5299
    assert s.t == 1.5


def test_monitor_runs_tegrastats_and_stops_it(tmp_path):
    """The subprocess path, with a stand-in `tegrastats` that prints recorded lines."""
    fake = tmp_path / "tegrastats"
    log = DATA / "orin-nx-16-jp5.log"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\nwhile true; do cat {log}; sleep 0.05; done\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    mon = TegrastatsMonitor(interval_ms=50, executable=str(fake))
    mon.start()
    deadline = time.time() + 10
    while len(mon.samples) < 3 and time.time() < deadline:
        time.sleep(0.05)
    mon.stop()
    assert (tmp_path / "args").read_text().split() == ["--interval", "50"]
    assert len(mon.samples) >= 3
    assert mon._proc.poll() is not None  # stopped: no sampler left behind
    ts = [s.t for s in mon.samples]
    assert ts == sorted(ts) and ts[0] >= 0
    summary = mon.summary()
    assert summary["source"] == "tegrastats" and summary["ram_used_mb"]["max"] == 6334
    assert mon.timeline()[0]["total_power_mw"] == 5299


def test_monitor_without_tegrastats_reports_error(tmp_path):
    mon = TegrastatsMonitor(executable=str(tmp_path / "missing"))
    mon.start()
    mon.stop()
    assert mon.error and "cannot start tegrastats" in mon.error
    assert mon.summary() is None


@pytest.mark.skipif(not os.path.exists("/etc/nv_tegra_release"), reason="not a Jetson")
def test_real_tegrastats_on_a_jetson():
    mon = TegrastatsMonitor(interval_ms=100)
    mon.start()
    time.sleep(1.0)
    mon.stop()
    assert mon.samples and mon.samples[-1].ram_total_mb > 0
