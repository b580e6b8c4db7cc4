"""What each quantization of the shipped SmolLM2 costs, in one report: the F16, Q8_0, Q5_K_M and Q4_K_M bundles
(built by `build --quant`) and the F16 weights with a q8_0 and a q4_0 KV cache, over 22k tokens of the Python
language reference that ships with CPython (pydoc_data, PSF licence). Perplexity and mean KL divergence
grow in the expected order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECIPE = Path(__file__).parents[2] / "recipes" / "smollm2-135m.yaml"
CHARS = 90_000  # about 22k tokens: 43 windows of 512, enough that Q8_0 and Q5_K_M part by more than noise


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", *args], capture_output=True, text=True,
                          timeout=1800, stdin=subprocess.DEVNULL)


def reference_text(path: Path) -> Path:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:CHARS], encoding="utf-8")
    return path


def test_the_quantization_ladder_in_one_report(embedded_build, tmp_path):
    out = embedded_build.bundle.parents[1]  # the session's build root: export and imatrix stamps reused
    bundles = {}
    for quant in ("f16", "q8_0", "q5_k_m"):
        proc = cli("build", "-r", str(RECIPE), "--target", "laptop-cpu", "--quant", quant, "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-2000:]
        bundles[quant] = Path(proc.stdout.strip().splitlines()[-1])
    bundles["q4_k_m"] = embedded_build.bundle
    proc = cli("eval", *(str(bundles[q]) for q in ("f16", "q8_0", "q5_k_m", "q4_k_m")),
               "--kv-variant", "q8_0", "--kv-variant", "q4_0", "--text", str(reference_text(tmp_path / "ref.txt")),
               "--n-ctx", "512", "--threads", "2", "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["text"]["tokens"] > 20_000
    rows = {(b["quant"], b["kv_type"]): b for b in report["bundles"]}
    assert list(rows) == [("f16", "f16"), ("q8_0", "f16"), ("q5_k_m", "f16"), ("q4_k_m", "f16"),
                          ("f16", "q8_0"), ("f16", "q4_0")]
    weights = [rows[(q, "f16")] for q in ("f16", "q8_0", "q5_k_m", "q4_k_m")]
    ppl = [b["perplexity"] for b in weights]
    assert ppl == sorted(ppl) and len(set(ppl)) == 4, ppl
    kld = [b.get("kld_mean", 0.0) for b in weights]
    assert kld == sorted(kld) and kld[1] > 0, kld
    kv8, kv4 = rows[("f16", "q8_0")], rows[("f16", "q4_0")]
    assert 0 < kv8["kld_mean"] < kv4["kld_mean"] and ppl[0] < kv8["perplexity"] < kv4["perplexity"]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert markdown.count("| q4_0 |") == 1 and (tmp_path / "report" / "plots" / "kld.png").stat().st_size > 1000
