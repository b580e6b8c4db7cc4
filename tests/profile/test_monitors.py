import mmap
import time

import numpy as np

from vishwamai_edge.profile.monitors import RssSampler, device_monitor, process_maxrss_bytes


def test_rss_sampler_samples_and_marks():
    rss = RssSampler(interval_s=0.01)
    rss.start()
    while not rss.samples:  # the baseline is the first sample: take it before the allocation
        time.sleep(0.01)
    rss.mark("load")
    # 64 MiB of a fresh anonymous mapping, written through (every page resident) and held while
    # the sampler runs. Not a numpy array: the allocator may hand back pages that earlier tests
    # freed but that are still resident, and then RSS does not move. On a loaded machine the
    # sampler thread may be scheduled late, so give it time to see the block.
    block = mmap.mmap(-1, 64 * 2**20)
    np.frombuffer(block, dtype=np.uint8)[:] = 1
    deadline = time.monotonic() + 5
    while max((v for _, v in rss.samples), default=0) < rss.baseline_bytes + 50 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.05)
    rss.mark("overhead")
    block.close()
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
