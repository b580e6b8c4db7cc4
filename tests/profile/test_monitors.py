import time

from vishwamai_edge.profile.monitors import RssSampler, device_monitor, process_maxrss_bytes


def test_rss_sampler_samples_and_marks():
    rss = RssSampler(interval_s=0.01)
    rss.start()
    rss.mark("load")
    block = bytearray(64 * 2**20)  # touch 64 MiB so RSS moves
    block[::4096] = b"x" * len(block[::4096])
    time.sleep(0.1)
    rss.mark("overhead")
    del block
    rss.stop()
    assert len(rss.samples) >= 5
    times = [t for t, _ in rss.samples]
    assert times == sorted(times)
    assert [m for _, m in rss.marks] == ["load", "overhead"]
    assert rss.peak_bytes >= rss.baseline_bytes + 50 * 2**20
    assert process_maxrss_bytes() >= rss.peak_bytes * 0.9


def test_peak_before_a_mark_and_thinning():
    rss = RssSampler()
    rss.samples = [(0.0, 100), (1.0, 300), (2.0, 200), (3.0, 900), (4.0, 250)]
    rss.marks = [(0.0, "load"), (2.5, "overhead")]
    assert rss.peak_before("overhead") == 300  # the raw model loaded at 3.0 is not the bundle's
    assert rss.peak_before("never") == 900
    rss.samples = [(i * 0.01, 100 + (i == 777) * 5000) for i in range(3000)]
    thin = rss.timeline(max_points=100)
    assert len(thin) <= 101 and max(v for _, v in thin) == 5100  # the peak survives thinning


def test_no_device_readings_on_a_cpu_only_machine():
    import os

    import pytest

    if os.path.exists("/etc/nv_tegra_release") or os.path.exists("/proc/driver/nvidia"):
        pytest.skip("a GPU or Jetson machine: its monitor is tested in test_nvml.py / test_tegrastats.py")
    assert device_monitor() is None
