"""Merge: adapter + base -> plain HF folder, its logits checked against base + adapter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from rich.console import Console

from vishwamai_edge.train.finetune import finetune, run_fingerprint
from vishwamai_edge.train.lora import FinetuneError
from vishwamai_edge.train.merge import merge_adapter

QUIET = Console(stderr=True, quiet=True)
PROMPTS = ["Where is Zorb?", "The capital of France is"]


@pytest.fixture(scope="module")
def fp16_base(tiny_model, tmp_path_factory):
    """The tiny Llama stored in fp16, like the embedded model."""
    out = tmp_path_factory.mktemp("tiny-fp16")
    src = tiny_model("llama")
    transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16).save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture
def adapter(fp16_base, chat_jsonl, make_recipe, tmp_path):
    recipe = make_recipe(fp16_base, chat_jsonl, steps=4)
    result = finetune(recipe, fp16_base, tmp_path / "ft", run_fingerprint(recipe, "t"), console=QUIET)
    return tmp_path / "ft" / "adapter", result


def last_logits(folder, prompt):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(**tok(prompt, return_tensors="pt")).logits[0, -1]


def test_merged_folder_matches_base_plus_adapter(adapter, fp16_base, tmp_path):
    adapter_dir, _ = adapter
    out = tmp_path / "merged"
    check = merge_adapter(adapter_dir, out, None, PROMPTS, tolerance=0.05, console=QUIET)  # base from the adapter
    # Measured: about 1e-3 on this tiny model (fp16 rounding of the merged weights; the fp32 merge itself ~1e-6).
    assert check.max_abs_diff < 0.05 and check.top1_agreement == 1.0
    assert check.saved_dtype == "float16" and check.merged_in == "float32"
    recorded = json.loads((out / "merge_check.json").read_text())
    assert recorded["max_abs_diff"] == pytest.approx(check.max_abs_diff, abs=1e-6) and recorded["tolerance"] == 0.05
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith("adapter_") for n in names)  # plain HF, no peft needed downstream
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    # the adapter changed the model
    assert (last_logits(out, PROMPTS[0]) - last_logits(fp16_base, PROMPTS[0])).abs().max() > 1e-2


def test_merge_out_of_tolerance_fails_and_writes_nothing(adapter, tmp_path):
    adapter_dir, _ = adapter
    with pytest.raises(FinetuneError, match="does not match base \\+ adapter"):
        merge_adapter(adapter_dir, tmp_path / "merged", None, PROMPTS, tolerance=1e-9, console=QUIET)
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))


def test_merge_command(adapter, tmp_path):
    adapter_dir, _ = adapter
    cli = [sys.executable, "-m", "vishwamai_edge.cli", "merge"]
    ok = subprocess.run(cli + ["--adapter", str(adapter_dir), "--out", str(tmp_path / "m")],
                        check=False, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(tmp_path / "m") and (tmp_path / "m/merge_check.json").is_file()
    bad = subprocess.run(cli + ["--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "x")],
                         check=False, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is not a LoRA adapter folder" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
