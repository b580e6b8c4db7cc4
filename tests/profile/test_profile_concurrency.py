"""`vishwamai-edge profile --scenarios concurrency --kv-type q8_0` on the shipped SmolLM2-135M GGUF:
one row per client count (1, 2, 4, 8, 16) with aggregate and per-stream tokens/s and TTFT, its
table and plot in the report, and the KV cache's type, size and quality against f16 recorded.

No speed is asserted (the machine is shared): only that each level ran every client to the
end and that the numbers are positive and hang together."""

from __future__ import annotations

import subprocess
import sys

import matplotlib.image
import pytest

from vishwamai_edge.profile import report as rpt
from vishwamai_edge.profile.concurrency import CLIENTS
from vishwamai_edge.sources.embedded import embedded_gguf

pytestmark = pytest.mark.e2e
DECODE = 8


@pytest.fixture(scope="module")
def profile_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile-concurrency")
    proc = subprocess.run(
        [sys.executable, "-m", "vishwamai_edge.cli", "profile", str(embedded_gguf()), "--out", str(out),
         "--scenarios", "concurrency", "--repeat", "1", "--warmup", "0", "--threads", "1",
         "--decode-tokens", str(DECODE), "--kv-type", "q8_0"],
        capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_one_row_per_client_count(profile_out):
    b = rpt.load_report(profile_out / "report.json")["bundles"][0]
    sc = b["scenarios"]["concurrency"]
    assert sc["status"] == "ok", sc.get("error")
    assert [lv["clients"] for lv in sc["levels"]] == list(CLIENTS)
    (run,) = sc["runs"]
    for lv in run["levels"]:
        n = lv["clients"]
        assert lv["ttft_s"]["n"] == n  # every client got its first text
        assert lv["per_stream_tps"]["n"] == n and lv["per_stream_tps"]["min"] > 0
        assert n <= lv["tokens"] <= n * DECODE
        assert lv["aggregate_tps"] == pytest.approx(lv["tokens"] / lv["wall_s"])
        assert 0 < lv["ttft_s"]["max"] < lv["wall_s"]
    for lv in sc["levels"]:
        assert lv["aggregate_tps"]["median"] > 0 and lv["ttft_max_s"]["median"] >= lv["ttft_s"]["median"]


def test_table_and_plot(profile_out):
    data = rpt.load_report(profile_out / "report.json")
    img = matplotlib.image.imread(profile_out / data["plots"]["concurrency"])
    assert img.shape[0] > 100 and img.shape[1] > 100
    md = (profile_out / "report.md").read_text()
    assert "### Concurrency" in md and "plots/concurrency.png" in md
    table = md.split("### Concurrency", 1)[1].split("###", 1)[0]
    assert len([r for r in table.splitlines() if r.startswith("| ") and "clients" not in r and "---" not in r]) == len(CLIENTS)


def test_kv_cache_recorded(profile_out):
    data = rpt.load_report(profile_out / "report.json")
    assert data["settings"]["kv_type_override"] == "q8_0"
    kv = data["bundles"][0]["kv_cache"]
    assert kv["type"] == "q8_0"
    assert kv["bytes"] == pytest.approx(kv["f16_bytes"] * 34 / 64, rel=1e-3)
    assert abs(kv["bytes"] - kv["formula_bytes"]) <= 0.01 * 2**20
    assert 0 < kv["quality"]["max_abs_logit_diff"] < 3.0 and kv["quality"]["top1_agreement"] > 0.9
    assert "### KV cache" in (profile_out / "report.md").read_text()
