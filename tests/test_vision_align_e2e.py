"""A vision-language model made here from real weights: EfficientNet-Lite0 (ImageNet) aligned to the
embedded SmolLM2-135M-Instruct on the shapes set, built to a Q4_K_M + ONNX bundle, asked about
pictures of colour-and-kind pairs it never saw in training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from vishwamai_edge.build import build
from vishwamai_edge.demo import BUILTIN_VISION, VISION_RECIPE, shapes_accuracy, vision_recipe
from vishwamai_edge.targets import get_target

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).parents[1]
CLI = [sys.executable, "-m", "vishwamai_edge.cli"]
QUIET = Console(stderr=True, quiet=True)
# max |logit difference| at the last position: F32 GGUF + fp32 ONNX against the aligned torch model.
# Measured 0.040 on SmolLM2's real logits (about +-20); the tiny random models of the vision tests
# (logits about +-1) stay within 5e-3. The top token must agree.
F32_TOLERANCE = 0.1


@pytest.fixture(scope="module")
def vision_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision")
    recipe = vision_recipe()
    result = build(recipe, get_target("laptop-cpu"), out, n_threads=2, console=QUIET)
    return out / recipe.name, result


def test_the_recipe_and_the_builtin_settings_agree():
    import yaml

    assert yaml.safe_load((ROOT / VISION_RECIPE).read_text()) == BUILTIN_VISION


def test_held_out_pictures_answered_through_the_q4_k_m_bundle(vision_build):
    root, result = vision_build
    assert result.manifest["llm"]["quant"] == "q4_k_m"
    entry = result.manifest["encoders"]["image"]
    assert entry["family"] == "aligned-efficientnet-lite0" and entry["n_tokens"] == 16
    assert entry["check"]["max_rel_diff"] < 1e-4  # the ONNX encoder against torch, checked by the build
    scores = shapes_accuracy(result.bundle, root / "finetune/shapes/eval.jsonl", threads=2)
    print("held-out accuracy", json.dumps(scores))
    assert scores["colour"]["asked"] == 60 and scores["shape"]["asked"] == 60
    # the goal: 90% of each; measured with this recipe: see the README
    assert scores["colour"]["accuracy"] >= 0.9 and scores["shape"]["accuracy"] >= 0.9, scores


def test_without_the_trained_projector_it_is_at_chance(vision_build, tmp_path):
    """The same bundle with the projector as it was before training (its seeded initial weights)."""
    import torch
    from safetensors.torch import save_file

    from vishwamai_edge.export.onnx import export_vision
    from vishwamai_edge.runtime.bundle import write_manifest
    from vishwamai_edge.train.aligned_folder import load_aligned
    from vishwamai_edge.train.projector import make_projector

    root, result = vision_build
    aligned = tmp_path / "untrained"
    shutil.copytree(root / "finetune/aligned", aligned)
    p = load_aligned(aligned).projector
    torch.manual_seed(vision_recipe().finetune.seed)  # as align seeds it
    fresh = make_projector(p.in_dim, p.out_dim, p.grid, p.tokens, p.depth, p.hidden)
    save_file(dict(fresh.state_dict()), str(aligned / "projector.safetensors"))
    bundle = tmp_path / "bundle"
    shutil.copytree(result.bundle, bundle)
    rel = result.manifest["encoders"]["image"]["file"]
    (bundle / rel).unlink()
    export_vision(aligned, bundle / rel, "fp32", threads=2)
    manifest = json.loads((bundle / "manifest.json").read_text())
    write_manifest(bundle, {k: v for k, v in manifest.items() if k != "files"}, list(manifest["files"]))
    scores = shapes_accuracy(bundle, root / "finetune/shapes/eval.jsonl", threads=2)
    print("untrained projector", json.dumps(scores))
    assert scores["colour"]["accuracy"] <= 0.5 and scores["shape"]["accuracy"] <= 0.6, scores


def test_bundle_logits_equal_the_aligned_torch_model(vision_build, tmp_path):
    """F32 GGUF + fp32 ONNX from the same aligned folder against the torch model on (image, prompt)."""
    import torch
    import transformers

    from vishwamai_edge.runtime.chat_template import render_chat
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline
    from vishwamai_edge.runtime.preprocess import preprocess
    from vishwamai_edge.train.shapes import ASK_COLOUR
    from vishwamai_edge.train.aligned_folder import load_aligned, splice

    root, _ = vision_build
    recipe = vision_recipe()
    f32 = recipe.model_copy(update={"export": recipe.export.model_copy(update={
        "gguf": recipe.export.gguf.model_copy(update={"outtype": "f32", "quants": []})})})
    result = build(f32, get_target("laptop-cpu"), root.parent, quant="f32", n_threads=2, console=QUIET)
    assert "aligned" in result.skipped  # the same aligned folder: trained once

    aligned = load_aligned(root / "finetune/aligned")
    llm = transformers.AutoModelForCausalLM.from_pretrained(aligned.llm_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(aligned.llm_dir)
    image_id, n = aligned.image_token["id"], aligned.projector.tokens
    pipeline = Pipeline.load(result.bundle, RuntimeOptions(n_threads=2))
    worst = 0.0
    try:
        session = pipeline.session()
        for name in ("eval-00000.png", "eval-00003.png", "eval-00011.png"):
            pixels = np.asarray(Image.open(root / "finetune/shapes/images" / name).convert("RGB"))
            messages = [{"role": "user", "content": [{"type": "image", "pixels": pixels},
                                                     {"type": "text", "text": ASK_COLOUR}]}]
            prompt = session.prompt(messages)
            pipeline.llm.prefill(prompt.segments(pipeline.encoders["image"].encode(prompt.images)))
            got = pipeline.llm.logits()
            # torch: the rendered text through the HF tokenizer, the placeholder repeated n times
            text = render_chat(pipeline.chat_template, [pipeline.prompts.for_template(m) for m in messages])
            hf = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert hf == prompt.tokens  # llama.cpp and transformers tokenize the prompt alike
            ids = [t for t in hf for t in ([t] * n if t == image_id else [t])]
            with torch.no_grad():
                x = torch.from_numpy(preprocess(pixels, aligned.spec)[None])
                rows = aligned.projector(aligned.encoder.module(x))
                ids_t = torch.tensor([ids])
                embeds = splice(llm.get_input_embeddings()(ids_t), ids_t, rows, image_id)
                want = llm(inputs_embeds=embeds).logits[0, -1].numpy()
            diff = float(np.abs(got - want).max())
            worst = max(worst, diff)
            assert got.argmax() == want.argmax()
    finally:
        pipeline.close()
    print("max |logit diff| bundle vs torch", worst)
    assert worst < F32_TOLERANCE


def test_chat_image_command_answers_a_held_out_picture(vision_build):
    root, result = vision_build
    rows = [json.loads(x) for x in (root / "finetune/shapes/eval.jsonl").read_text().splitlines()]
    row = rows[0]
    image = root / "finetune/shapes" / row["messages"][0]["content"][0]["image"]
    question = row["messages"][0]["content"][1]["text"]
    proc = subprocess.run([*CLI, "chat", str(result.bundle), "--image", str(image), "-p", question,
                           "--max-tokens", "12", "--threads", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert row["colour"] in proc.stdout.lower() if "colour" in question else row["shape"] in proc.stdout.lower()
    assert "1 image(s) encoded" in proc.stderr


def test_eval_tasks_ask_the_held_out_pictures(vision_build, tmp_path):
    """`eval --tasks` as VQA: the held-out questions as task lines with images, answered through the
    bundle's encoder; the same goal as the demo's own count (90% of each attribute)."""
    from vishwamai_edge.train.shapes import held_out_questions

    root, result = vision_build
    items = held_out_questions(root / "finetune/shapes/eval.jsonl")
    tasks = tmp_path / "vqa.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"{x['attribute']}-{i}", "question": x["question"], "image": str(x["image"]),
                                         "answer": x["truth"], "match": "contains"}) + "\n"
                             for i, x in enumerate(items)))
    proc = subprocess.run([*CLI, "eval", str(result.bundle), "--tasks", str(tasks), "--threads", "2",
                           "--out", str(tmp_path / "report")], capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "report" / "report.json").read_text())["bundles"][0]["tasks"]
    answers = [json.loads(x) for x in (tmp_path / "report" / "answers.jsonl").read_text().splitlines()]
    assert summary["tasks"] == len(items) == 120 and len(answers) == 120
    by = {a: [r["right"] for r in answers if r["id"].startswith(a)] for a in ("colour", "shape")}
    print("eval VQA", {a: sum(v) / len(v) for a, v in by.items()})
    assert all(sum(v) / len(v) >= 0.9 for v in by.values()), by
