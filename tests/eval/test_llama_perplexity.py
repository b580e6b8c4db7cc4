"""`eval` agrees with llama.cpp's own `llama-perplexity` (built from the llama.cpp that llama-cpp-python
vendors, by .ci/install-llama-tools) on the same GGUFs, text and context: perplexity, mean KL divergence
and same-top-token rate within 1% relative, for a quantized model and for a quantized KV cache."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from needs import missing

pytestmark = pytest.mark.e2e

N_CTX = 256
TEXT = Path(__file__).parents[2] / "vishwamai_edge" / "data" / "eval-text.txt"


def llama_perplexity() -> str:
    tool = shutil.which("llama-perplexity")
    if tool is None:
        missing("llama-perplexity is not installed (bash .ci/install-llama-tools)")
    return tool


def run_tool(*args: str) -> str:
    proc = subprocess.run([llama_perplexity(), "-c", str(N_CTX), "-t", "2", *args], capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def number(log: str, label: str) -> float:
    """The first number after `label` in llama-perplexity's statistics (a percentage as a fraction)."""
    found = re.search(re.escape(label) + r"\s*[:=]\s*(-?[\d.]+)(?:\s*±\s*[\d.]+)?\s*(%?)", log)
    assert found, f"{label!r} not in llama-perplexity's output:\n{log[-3000:]}"
    return float(found.group(1)) / (100 if found.group(2) else 1)


@pytest.fixture(scope="module")
def theirs(embedded_build, tmp_path_factory):
    """llama-perplexity's numbers: the F16 base (saving its logits), then the Q4_K_M model and the F16 model
    with a q8_0 KV cache against that base."""
    tmp = tmp_path_factory.mktemp("llama-perplexity")
    f16 = embedded_build.bundle.parent / "export" / "model-f16.gguf"
    q4 = embedded_build.bundle / json.loads((embedded_build.bundle / "manifest.json").read_text())["llm"]["file"]
    base = tmp / "base.kld"
    return {
        "f16": run_tool("-m", str(f16), "-f", str(TEXT), "--kl-divergence-base", str(base)),
        "q4_k_m": run_tool("-m", str(q4), "--kl-divergence-base", str(base), "--kl-divergence"),
        "kv_q8_0": run_tool("-m", str(f16), "--kl-divergence-base", str(base), "--kl-divergence",
                            "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"),
    }


@pytest.fixture(scope="module")
def ours(embedded_build, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("eval")
    shutil.copy(embedded_build.bundle.parent / "export" / "model-f16.gguf", out / "model-f16.gguf")
    bundle = out / "q4"
    shutil.copytree(embedded_build.bundle, bundle)
    proc = subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", "eval", str(out / "model-f16.gguf"), str(bundle),
                           "--kv-variant", "q8_0", "--text", str(TEXT), "--n-ctx", str(N_CTX), "--threads", "2",
                           "--out", str(out / "report")], capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "report" / "report.json").read_text())


def test_the_reference_perplexity_agrees(ours, theirs):
    ref = ours["bundles"][0]
    assert ref["perplexity"] == pytest.approx(number(theirs["f16"], "Final estimate: PPL"), rel=0.01)
    chunks = int(re.search(r"calculating perplexity over (\d+) chunks", theirs["f16"]).group(1))
    assert ours["windows"] == chunks and ref["tokens"] == chunks * (N_CTX - 1 - N_CTX // 2)


@pytest.mark.parametrize("row, run", [(1, "q4_k_m"), (2, "kv_q8_0")])
def test_perplexity_and_kl_divergence_agree(ours, theirs, row, run):
    mine, log = ours["bundles"][row], theirs[run]
    assert mine["perplexity"] == pytest.approx(number(log, "Mean PPL(Q)"), rel=0.01)
    assert mine["kld_mean"] == pytest.approx(number(log, "Mean    KLD"), rel=0.01)
    assert mine["same_top"] == pytest.approx(number(log, "Same top p"), rel=0.01)
    assert mine["kld_max"] == pytest.approx(number(log, "Maximum KLD"), rel=0.05)
    assert mine["kld_mean"] > 1e-4  # a difference was measured: agreeing on nothing would prove nothing
