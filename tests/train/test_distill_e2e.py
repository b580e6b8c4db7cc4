"""Prune and distill the real SmolLM2-135M-Instruct through `build`: the shipped recipe, shortened (30 steps of
128-token blocks), cuts 30 blocks to 20 and wins back most of the held-out perplexity it lost; the student's
Q4_K_M bundle, scored by `eval` beside the teacher's on held-out text, is nearer the teacher than the pruned
model was, and its memory plan is smaller."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from rich.console import Console

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def distill_build(tmp_path_factory):
    from vishwamai_edge.build import build
    from vishwamai_edge.recipe import load_recipe
    from vishwamai_edge.targets import get_target

    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m-distill.yaml",
                         ["finetune.steps=30", "finetune.max_seq_len=128", "prune.calibration_tokens=512"])
    out = tmp_path_factory.mktemp("distill-build")
    return build(recipe, get_target("laptop-cpu"), out, console=Console(stderr=True, quiet=True)), out


def test_a_pruned_student_recovers_most_of_the_gap(distill_build, embedded_bundle, tmp_path):
    from vishwamai_edge.eval.runner import Row, run_eval

    result, out = distill_build
    checks = result.manifest["checks"]
    prune = checks["prune"]
    assert prune["layers"] == [30, 20] and len(prune["dropped"]) == 10 and prune["check_max_abs_diff"] < 1e-3
    record = checks["finetune"]
    assert record["method"] == "distill" and record["objective"]["loss"] == "forward_kl"
    held = record["held_out"]
    # measured: teacher 16.6, pruned 80, distilled about 30
    assert held["teacher"]["ppl"] < held["after"]["ppl"] < held["student"]["ppl"], held
    assert held["recovered"] >= 0.6, held
    assert held["after"]["divergence"] < 0.5 * held["student"]["divergence"], held
    assert record["last_step"]["loss"] < 1.0

    # through llama.cpp: both bundles scored on the held-out topics, KL divergence from the teacher's
    text = out / "smollm2-135m-distill" / "finetune" / "python-docs" / "eval.txt"
    report = run_eval([Row(embedded_bundle), Row(result.bundle)], tmp_path / "eval", text, n_ctx=256,
                      console=Console(stderr=True, quiet=True)).report
    teacher, student = report["bundles"]
    assert student["perplexity"] < held["student"]["ppl"] and student["perplexity"] < 2.5 * teacher["perplexity"], \
        report["bundles"]
    assert math.isfinite(student["kld_mean"])

    plan = result.manifest["memory_plan"]
    assert plan["weights_gb"] < 0.8 * 0.1 and plan["fits"]  # a 99M-parameter model's Q4_K_M weights
