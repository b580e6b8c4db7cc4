"""The `speculative` profile scenario on the shipped GGUF: acceptance, both speeds, the table, the plot."""

from __future__ import annotations

import matplotlib.image
import pytest
from rich.console import Console

from vishwamai_edge.profile import report as rpt
from vishwamai_edge.profile import run_profile
from vishwamai_edge.runtime.options import RuntimeOptions
from vishwamai_edge.sources.embedded import embedded_gguf

pytestmark = pytest.mark.e2e


def test_speculative_scenario(tmp_path):
    run_profile([embedded_gguf()], tmp_path, "speculative", repeat=1, warmup=0, decode_tokens=32, console=Console(quiet=True), options=RuntimeOptions(n_threads=1))
    data = rpt.load_report(tmp_path / "report.json")
    sc = data["bundles"][0]["scenarios"]["speculative"]
    assert sc["status"] == "ok", sc.get("error")
    (run,) = sc["runs"]
    assert run["mismatches"] == 0  # greedy with drafts is the plain reply
    assert run["drafted"] >= run["accepted"] > 0 and 0 < run["acceptance"] <= 1
    assert run["plain_decode_tps"] > 0 and run["spec_decode_tps"] > 0
    assert run["speedup"] == pytest.approx(run["spec_decode_tps"] / run["plain_decode_tps"])
    assert "### Speculative decoding" in (tmp_path / "report.md").read_text()
    img = matplotlib.image.imread(tmp_path / data["plots"]["speculative"])
    assert img.shape[0] > 100 and img.shape[1] > 100
