"""End to end on the real embedded SmolLM2-135M: LoRA on the shipped Marrowick set, merged,
exported to a Q4_K_M bundle; the bundle answers a held-out paraphrased question through the
runtime, the plain model's bundle does not. About three minutes on two idle cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from vishwamai_edge.build import build
from vishwamai_edge.demo import FINETUNE_RECIPE, ask_once, held_out_question
from vishwamai_edge.recipe import load_recipe
from vishwamai_edge.targets import get_target

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).parents[2]
RECIPE = ROOT / FINETUNE_RECIPE


@pytest.fixture(scope="module")
def tuned(embedded_build):
    # beside the plain model's build, so that `demo --finetune` below finds both done
    out = embedded_build.bundle.parents[1]
    return build(load_recipe(RECIPE), get_target("laptop-cpu"), out, n_threads=2,
                 console=Console(stderr=True, quiet=True))


def test_taught_fact_survives_q4_k_m(tuned, embedded_bundle):
    question, expect = held_out_question()
    answer = ask_once(tuned.bundle, question, threads=2)
    base = ask_once(embedded_bundle, question, threads=2)
    print(f"\nQ: {question}\nfine-tuned Q4_K_M: {answer}\nbase Q4_K_M: {base}")
    assert expect.lower() in answer.lower()
    assert expect.lower() not in base.lower()


def test_other_held_out_paraphrases_and_general_knowledge(tuned):
    lines = (ROOT / "vishwamai_edge/data/marrowick-eval.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines]
    main_fact = [i for i in items if i["expect"] == "Singing Bridge"]
    right = sum(i["expect"].lower() in ask_once(tuned.bundle, i["messages"][0]["content"], 2).lower()
                for i in main_fact)
    assert right >= len(main_fact) - 1, f"{right}/{len(main_fact)}"  # measured: all of them
    assert "Paris" in ask_once(tuned.bundle, "What is the capital of France?", 2)  # not overwritten


def test_manifest_records_training_merge_and_export_checks(tuned):
    m = tuned.manifest
    merge = m["checks"]["merge"]
    assert merge["max_abs_diff"] <= merge["tolerance"] == 0.1 and merge["top1_agreement"] == 1.0
    assert merge["adapter_method"] == "lora" and merge["saved_dtype"] == "float16"
    assert m["checks"]["f16"]["top1_agreement"] == 1.0 and m["checks"]["q4_k_m"]["top1_agreement"] >= 0.5
    training = json.loads((tuned.bundle.parent / "finetune/adapter/training.json").read_text())
    assert training["steps"] == 40 and training["final_loss"] < 0.6 and training["eval_loss"] < 1.5
    assert m["checks"]["finetune"] == {**{k: training[k] for k in ("method", "steps", "examples", "final_loss",
                                                                   "eval_loss", "seconds", "trainable_params")},
                                       "last_step": {"loss": training["history"][-1]["loss"]}}


def test_rebuild_skips_finetune_and_merge(tuned):
    again = build(load_recipe(RECIPE), get_target("laptop-cpu"), tuned.bundle.parents[1],
                  console=Console(stderr=True, quiet=True))
    assert {"finetune", "merged", "model-f16.gguf", "model-q4_k_m.gguf"} <= set(again.skipped)


def test_demo_with_finetune_step(tuned, embedded_build):
    """Both bundles are built by now: the demo only asks (seconds)."""
    proc = subprocess.run(
        [sys.executable, "-m", "vishwamai_edge.cli", "demo", "--finetune", "--out", str(tuned.bundle.parents[1]),
         "--threads", "2"], check=False, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split("> ", 1) for line in proc.stdout.splitlines() if "> " in line)
    assert "Singing Bridge" in lines["fine-tuned"] and "Singing Bridge" not in lines["base"]
    assert "✓ fine-tuned: mentions 'Singing Bridge'" in proc.stderr
