"""`vishwamai-edge eval`: the numbers by hand on small arrays, then on the shipped SmolLM2: its F16 GGUF against
its Q4_K_M bundle over the shipped text, the report and the records beside the bundles, and the one-line
errors of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vishwamai_edge.errors import InputError
from vishwamai_edge.eval.scoring import Scores, log_softmax, windows
from vishwamai_edge.fsutil import sha256_file

pytestmark = pytest.mark.e2e


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", *args], capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)


def test_the_numbers_by_hand():
    rng = np.random.default_rng(0)
    ref_logits, logits = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    targets = np.array([0, 3, 6, 2, 2])
    p_ref, p = np.exp(log_softmax(ref_logits)), np.exp(log_softmax(logits))
    scores = Scores()
    scores.add(logits, targets, log_softmax(ref_logits))
    s = scores.summary()
    nll = -np.log(p[np.arange(5), targets])
    assert s["tokens"] == 5 and s["perplexity"] == pytest.approx(float(np.exp(nll.mean())))
    kld = (p_ref * (np.log(p_ref) - np.log(p))).sum(-1)
    assert s["kld_mean"] == pytest.approx(float(kld.mean())) and s["kld_max"] == pytest.approx(float(kld.max()))
    assert s["same_top"] == pytest.approx(float((p.argmax(-1) == p_ref.argmax(-1)).mean()))
    dp = p[np.arange(5), targets] - p_ref[np.arange(5), targets]
    assert s["delta_p_mean"] == pytest.approx(float(dp.mean()))
    same = Scores()
    same.add(ref_logits, targets, log_softmax(ref_logits))
    assert same.summary()["kld_max"] == 0.0 and same.summary()["same_top"] == 1.0


def test_windows_as_llama_perplexity_cuts_them():
    tokens = list(range(10, 33))  # 23 tokens: two whole windows of 10, the rest dropped
    cut = windows(tokens, 10, bos=1)
    assert cut == [[1, *range(11, 20)], [1, *range(21, 30)]]
    assert windows(tokens, 10, bos=None)[1][0] == 20
    with pytest.raises(InputError, match="shorter than one window of 64"):
        windows(tokens, 64, bos=1)


def test_q4_k_m_against_f16_over_the_shipped_text(embedded_build, tmp_path):
    """The F16 GGUF is the reference; the same file again costs exactly nothing; the Q4_K_M bundle costs
    perplexity and KL divergence. Nothing in the bundles changes; a record lies beside each."""
    f16 = tmp_path / "model-f16.gguf"
    shutil.copy(embedded_build.bundle.parents[0] / "export" / "model-f16.gguf", f16)
    again = tmp_path / "again" / "model-f16.gguf"
    again.parent.mkdir()
    shutil.copy(f16, again)
    bundle = tmp_path / "q4"
    shutil.copytree(embedded_build.bundle, bundle)
    before = {p.name: sha256_file(p) for p in bundle.rglob("*") if p.is_file()}
    proc = cli("eval", str(f16), str(again), str(bundle), "--n-ctx", "256", "--threads", "2",
               "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    ref, same, q4 = report["bundles"]
    assert report["windows"] == report["text"]["tokens"] // 256 >= 4
    assert ref["reference"] and ref["tokens"] == report["windows"] * 127
    assert same["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
    assert same["kld_max"] < 1e-6 and same["same_top"] == 1.0
    assert q4["perplexity"] > ref["perplexity"] and 0.001 < q4["kld_mean"] < 0.2
    assert 0.7 < q4["same_top"] < 1.0 and q4["kld_median"] <= q4["kld_p99"] <= q4["kld_max"]
    for name in ("report.md", "report.html", "plots/kld.png"):
        assert (tmp_path / "report" / name).stat().st_size > 200
    assert "mean KLD" in (tmp_path / "report" / "report.md").read_text()
    assert {p.name: sha256_file(p) for p in bundle.rglob("*") if p.is_file()} == before
    beside = json.loads((tmp_path / "q4.eval.json").read_text())
    assert [r["kld_mean"] for r in beside["results"]] == [q4["kld_mean"]] and beside["text"]["source"] == "eval-text.txt"


def _one_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_input_is_one_line(embedded_bundle, tiny_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill a window.")
    _one_line(cli("eval", str(embedded_bundle), "--text", str(short)), "shorter than one window")
    _one_line(cli("eval", str(embedded_bundle), "--text", str(tmp_path / "none.txt")), "no such file")
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 50)
    _one_line(cli("eval", str(embedded_bundle), "--text", str(binary)), "not a UTF-8 text file")

    from vishwamai_edge.export.gguf import convert_hf_to_gguf

    other = convert_hf_to_gguf(tiny_model("llama"), tmp_path / "other.gguf", "f32").path
    _one_line(cli("eval", str(embedded_bundle), str(other), "--n-ctx", "64"), "another vocabulary")


def test_the_recipe_eval_check_fails_a_build(embedded_build, tmp_path):
    """`checks.eval` scores the bundle's GGUF against the F16 export before packaging: a missed bar fails
    the build in one line and writes no bundle; a bar met records the numbers in the manifest, and the
    second build judges the numbers of the first (the eval is not run again)."""
    root = tmp_path / "smollm2-135m"
    root.mkdir()
    shutil.copytree(embedded_build.bundle.parent / "export", root / "export")  # stamps kept: no re-export
    recipe = tmp_path / "checked.yaml"
    recipe.write_text((Path(__file__).parents[2] / "recipes" / "smollm2-135m.yaml").read_text()
                      + "checks:\n  eval:\n    n_ctx: 256\n    max_kld_mean: 0.001\n")
    build = ("build", "-r", str(recipe), "--target", "laptop-cpu", "--out", str(tmp_path))
    _fails_in_one_line(cli(*build), "checks.eval", "mean KLD", "max_kld_mean 0.001", "no bundle written")
    assert not (root / "laptop-cpu").exists() and (root / "eval" / "model-q4_k_m" / "report.md").is_file()
    proc = cli(*build, "--set", "checks.eval.max_kld_mean=0.2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "eval of model-q4_k_m.gguf (up to date)" in proc.stderr
    check = json.loads((root / "laptop-cpu" / "manifest.json").read_text())["checks"]["eval"]
    assert 0.001 < check["kld_mean"] < 0.2 and check["ppl_ratio"] > 1 and check["against"] == "model-f16.gguf"
    _one_line(cli(*build, "--set", "checks.eval.min_accuracy=0.5"), "min_accuracy", "needs tasks")


def _fails_in_one_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    """A build's progress lines, then its one error line last."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == [proc.stderr.strip().splitlines()[-1]], proc.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_an_hf_folder_as_the_reference(tiny_model, tmp_path):
    """The reference may be a text model's HF folder: converted to F16 as the build converts it (once:
    a second eval reuses it), then scored like any GGUF; against its own F32 export the cost is ~0."""
    from vishwamai_edge.export.gguf import convert_hf_to_gguf

    hf = tiny_model("llama")
    f32 = convert_hf_to_gguf(hf, tmp_path / "model-f32.gguf", "f32").path
    args = ("eval", str(hf), str(f32), "--n-ctx", "64", "--out", str(tmp_path / "report"))
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref, row = json.loads((tmp_path / "report" / "report.json").read_text())["bundles"]
    assert ref["path"] == str(tmp_path / "report" / "reference" / "model-f16.gguf")
    assert row["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-3) and row["kld_mean"] < 1e-4
    mtime = (tmp_path / "report" / "reference" / "model-f16.gguf").stat().st_mtime_ns
    assert cli(*args).returncode == 0
    assert (tmp_path / "report" / "reference" / "model-f16.gguf").stat().st_mtime_ns == mtime
