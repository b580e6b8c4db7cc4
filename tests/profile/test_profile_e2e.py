"""A short real profile of the embedded model's bundle: report files, schema, plausible numbers.

Timings are never asserted against thresholds (the machine is shared); only that they exist,
are positive and hang together (TTFT = its parts; tokens counted exactly).
"""

from __future__ import annotations

import matplotlib.image
import pytest
from rich.console import Console

from vishwamai_edge.profile import report as rpt
from vishwamai_edge.profile import run_profile
from vishwamai_edge.runtime.options import RuntimeOptions

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def short_profile(embedded_bundle, tmp_path_factory):
    # one thread: on a shared machine llama.cpp's threads stall each other when a core is taken
    out = tmp_path_factory.mktemp("profile")
    run_profile([embedded_bundle], out, "chat,prompt-512,image,overhead", repeat=1, warmup=0, decode_tokens=16, console=Console(quiet=True), options=RuntimeOptions(n_threads=1))
    return out


def test_report_files(short_profile):
    data = rpt.load_report(short_profile / "report.json")
    assert data["status"] == "complete" and data["schema_version"] == 1
    for rel in data["plots"].values():
        img = matplotlib.image.imread(short_profile / rel)
        assert img.shape[0] > 100 and img.shape[1] > 100
    assert "### Side by side" in (short_profile / "report.md").read_text()
    assert (short_profile / "report.html").read_text().count("data:image/png;base64,") == 3


def test_measurements(short_profile):
    b = rpt.load_report(short_profile / "report.json")["bundles"][0]
    assert b["quant"] == "q4_k_m" and b["model"]["n_layer"] == 30 and b["model"]["n_head_kv"] == 3
    assert b["load"]["load_s"]["median"] > 0
    assert b["memory"]["peak_rss_bytes"] > b["memory"]["baseline_rss_bytes"] > 0
    assert b["backend_memory"]["model_bytes"] > 50e6

    prompt = b["scenarios"]["prompt-512"]
    (run,) = prompt["runs"]
    assert run["prompt_tokens"] == 512 and run["decode_tokens"] == 16
    assert run["ttft_s"] == pytest.approx(run["prefill_s"] + run["first_token_s"])
    assert run["prefill_tps"] > 0 and run["decode_tps"] > 0 and 0 < run["roofline_ratio"] < 1

    chat = b["scenarios"]["chat"]["runs"][0]
    assert 10 < chat["prompt_tokens"] < 100 and chat["decode_tokens"] >= 1
    assert chat["tokenize_s"] > 0 and chat["ttft_s"] >= chat["prefill_s"]

    overhead = b["scenarios"]["overhead"]["runs"][0]
    assert overhead["raw_decode_tps"] > 0 and overhead["overhead_ratio"] > 0
    assert b["scenarios"]["image"]["status"] == "skipped"
