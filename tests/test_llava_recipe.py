"""recipes/llava-1.5-7b.yaml on a tiny model with llava-hf/llava-1.5-7b-hf's exact layout (config keys,
tensor names, fp16 shards, Llama-2 SentencePiece with <image> 32000 / <pad> 32001, processor files):
`vishwamai-edge build` through the CLI -> bundle -> runtime logits against transformers, `chat --image`;
the default Q4_K_M build; and a LoRA fine-tune (language model + projector) that survives the export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_vlm_e2e import TOLERANCE, Reference, conversation, hf_messages, one_image_turn, photo, runtime_logits
from vision_models import LLAVA15_CONFIG, LLAVA15_PREPROCESSOR, build_tiny_llava15_hf

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "llava-1.5-7b.yaml"
QUESTION = "What is in this picture?"
N_TOKENS = 9  # (42 / 14)^2 patches, CLS dropped
NON_SQUARE = ((60, 42, 0), (42, 97, 1), (23, 50, 2))  # tall, wide, smaller than the crop


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def build_cli(recipe: Path, out: Path, *overrides: str, quant: str | None = None) -> Path:
    args = ["build", "--recipe", str(recipe), "--out", str(out), "--threads", "2"]
    for item in overrides:
        args += ["--set", item]
    if quant:
        args += ["--quant", quant]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bundles = [p.parent for p in out.glob("*/*/manifest.json")]
    assert len(bundles) == 1, bundles
    return bundles[0]


F32 = ("export.gguf.outtype=f32", "export.vision.dtype=fp32", "export.gguf.imatrix=false",
       "export.gguf.quants=[]")


@pytest.fixture(scope="module")
def llava15(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llava15")
    return build_tiny_llava15_hf(root / "llava-1.5-7b-hf", root / "work")


@pytest.fixture(scope="module")
def f32_bundle(llava15, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build-f32")
    return build_cli(RECIPE, out, f"source.path={llava15}", *F32, quant="f32")


def test_tiny_model_has_the_hub_layout(llava15):
    import transformers as T

    config = json.loads((llava15 / "config.json").read_text())
    assert config.keys() == LLAVA15_CONFIG.keys()
    assert {k: v for k, v in config.items() if not isinstance(v, dict)} == {
        k: v for k, v in LLAVA15_CONFIG.items() if not isinstance(v, dict)}
    assert config["vision_config"]["patch_size"] == 14 and config["text_config"]["vocab_size"] == 32064
    names = json.loads((llava15 / "model.safetensors.index.json").read_text())["weight_map"]
    assert {n.split(".")[0] for n in names} == {"language_model", "vision_tower", "multi_modal_projector"}
    assert "language_model.lm_head.weight" in names and "multi_modal_projector.linear_2.weight" in names
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in names
    pre = json.loads((llava15 / "preprocessor_config.json").read_text())
    assert pre.keys() == LLAVA15_PREPROCESSOR.keys() and pre["image_processor_type"] == "CLIPImageProcessor"
    tok = T.AutoTokenizer.from_pretrained(llava15)
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001] and len(tok) == 32002
    assert T.LlavaForConditionalGeneration.from_pretrained(llava15).config.image_token_index == 32000


def test_manifest(f32_bundle):
    m = json.loads((f32_bundle / "manifest.json").read_text())
    assert m["recipe"] == "llava-1.5-7b" and m["llm"]["quant"] == "f32"
    assert m["llm"]["image_token"] == {"text": "<image>", "id": 32000}
    assert "<image>" in m["llm"]["chat_template"]
    image = m["encoders"]["image"]
    assert image["file"] == "encoders/vision-fp32.onnx" and image["file"] in m["files"]
    assert (image["n_tokens"], image["hidden"], image["family"]) == (N_TOKENS, 64, "clip")
    pre = image["preprocess"]
    assert pre["kind"] == "clip" and pre["shortest_edge"] == 42 and pre["crop_size"] == [42, 42]
    assert pre["pad_to_square"] is False  # llava-hf's processor: resize + centre crop, no padding
    assert pre["mean"] == LLAVA15_PREPROCESSOR["image_mean"]
    assert pre["std"] == LLAVA15_PREPROCESSOR["image_std"]
    assert m["mmproj"]["file"] == "llm/mmproj-f32.gguf" and m["mmproj"]["file"] in m["files"]
    assert m["runtime"]["n_ctx"] == 4096
    assert m["checks"]["f32"]["max_abs_diff"] < 0.01 and m["checks"]["f32"]["tokenizer_agreement"] == 1.0
    assert m["checks"]["vision"]["max_rel_diff"] < 1e-4


def _max_diffs(bundle: Path, reference: Reference) -> list[float]:
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(bundle, RuntimeOptions(n_threads=2))
    diffs = []
    try:
        assert pipeline.encoders["image"].n_tokens == N_TOKENS
        for h, w, seed in NON_SQUARE:
            img = photo(h, w, seed)
            messages = [one_image_turn(img)]
            want = reference.last_logits(hf_messages(messages), [img], N_TOKENS)
            got = runtime_logits(pipeline, messages)
            assert got.argmax() == want.argmax(), (h, w)
            diffs.append(float(np.abs(got - want).max()))
    finally:
        pipeline.close()
    return diffs


def test_runtime_logits_equal_transformers_on_non_square_images(llava15, f32_bundle):
    diffs = _max_diffs(f32_bundle, Reference(llava15))
    print("runtime vs transformers, max |logit diff| per image:", diffs)
    assert max(diffs) < TOLERANCE["f32"], diffs


# user turns (text, images shown first) with the assistant's answers between them: images in a later turn too
CONVERSATIONS = {
    "two turns": ([("Describe it.", 1), ("And this one?", 1)], ["A red square."]),
    "three turns": ([("What is it?", 1), ("Is it big?", 0), ("Compare them.", 2)], ["A blue circle.", "No."]),
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_multi_turn_prompts_tokenize_and_answer_as_transformers(llava15, f32_bundle, name):
    """The prompt tokenized as transformers tokenizes it for LLaVA (its processor's tokenizer: tokenizer.json,
    whose normalizer, not the `legacy: false` beside it, marks the text after `<image>`), every turn."""
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    questions, answers = CONVERSATIONS[name]
    images = [photo(40 + 9 * i, 50, i) for i, (_, n) in enumerate(questions) for _ in range(n)]
    messages = conversation(questions, answers, images, answer_parts=True)
    reference = Reference(llava15)
    text = reference.tokenizer.apply_chat_template(hf_messages(messages), add_generation_prompt=True,
                                                   tokenize=False)
    pipeline = Pipeline.load(f32_bundle, RuntimeOptions(n_threads=2))
    try:
        assert pipeline.session().prompt(messages).tokens == reference.tokenizer(text)["input_ids"]
        want = reference.last_logits(hf_messages(messages), images, N_TOKENS)
        got = runtime_logits(pipeline, messages)
    finally:
        pipeline.close()
    assert got.argmax() == want.argmax()
    assert float(np.abs(got - want).max()) < TOLERANCE["f32"]


def _direct_answer(bundle: Path, img: np.ndarray, max_tokens: int = 12) -> str:
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(bundle, RuntimeOptions(n_threads=2))
    try:
        return "".join(pipeline.session(max_tokens=max_tokens).ask(QUESTION, images=[img]))
    finally:
        pipeline.close()


def _chat(bundle: Path, png: Path) -> subprocess.CompletedProcess:
    return cli("chat", str(bundle), "--image", str(png), "-p", QUESTION, "--max-tokens", "12",
               "--threads", "2", timeout=300)


def test_chat_image_answers_like_the_pipeline(f32_bundle, tmp_path):
    from PIL import Image

    img = photo(60, 42, 7)
    Image.fromarray(img).save(tmp_path / "pic.png")
    proc = _chat(f32_bundle, tmp_path / "pic.png")
    assert proc.returncode == 0, proc.stderr
    direct = _direct_answer(f32_bundle, img)
    print("f32 answer:", repr(direct))
    assert direct.strip() and proc.stdout.strip() == direct.strip()
    assert "1 image(s) encoded" in proc.stderr


def test_default_build_q4_k_m(llava15, tmp_path):
    from PIL import Image

    bundle = build_cli(RECIPE, tmp_path / "out", f"source.path={llava15}")  # recipe as shipped: f16 -> q4_k_m
    m = json.loads((bundle / "manifest.json").read_text())
    assert bundle.name == "laptop-cpu" and m["llm"]["quant"] == "q4_k_m"
    assert m["llm"]["file"] == "llm/model-q4_k_m.gguf"
    assert m["encoders"]["image"]["dtype"] == "fp16" and m["mmproj"]["file"] == "llm/mmproj-f16.gguf"
    stamp = json.loads((bundle.parent / "export" / "model-q4_k_m.gguf.stamp.json").read_text())
    assert stamp["result"]["imatrix"] is True and m["checks"]["q4_k_m"]["top1_agreement"] >= 0.5
    print("q4_k_m tensor types:", m["llm"]["tensor_types"], "check:", m["checks"]["q4_k_m"])
    img = photo(42, 97, 8)
    Image.fromarray(img).save(tmp_path / "pic.png")
    proc = _chat(bundle, tmp_path / "pic.png")
    assert proc.returncode == 0, proc.stderr
    print("q4_k_m answer:", repr(proc.stdout.strip()))
    assert proc.stdout.strip() and proc.stdout.strip() == _direct_answer(bundle, img).strip()


# -- a fine-tuned VLM keeps its vision through export -----------------------------------------------
def _vlm_dataset(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, colour in enumerate(["red", "green", "blue", "black"]):
        Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"{i}.png"},
                                         {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"It is {colour}."}]},
        ]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_finetuned_vlm_keeps_its_vision_through_export(llava15, tmp_path):
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe.update(name="llava-1.5-7b-ft", source={"kind": "hf", "path": str(llava15)})
    recipe["finetune"] = {
        "method": "lora", "dataset": {"train": str(_vlm_dataset(tmp_path / "data"))},
        "lora": {"r": 4, "alpha": 8, "train_projector": True}, "max_seq_len": 128, "steps": 6,
        "batch_size": 4, "micro_batch_size": 4, "lr": 1e-2, "lr_schedule": "constant", "save_every": 6,
        "seed": 0,
    }
    path = tmp_path / "llava-ft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    bundle = build_cli(path, out, *F32, quant="f32")
    merged = out / "llava-1.5-7b-ft" / "merged"
    for name in ("tokenizer.json", "tokenizer.model", "preprocessor_config.json", "processor_config.json",
                 "chat_template.json", "merge_check.json"):
        assert (merged / name).is_file(), name
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["checks"]["merge"]["max_abs_diff"] < 0.1 and m["encoders"]["image"]["n_tokens"] == N_TOKENS

    to_merged = _max_diffs(bundle, Reference(merged))
    print("bundle vs merged torch, max |logit diff| per image:", to_merged)
    assert max(to_merged) < TOLERANCE["f32"], to_merged
    base, tuned = Reference(llava15), Reference(merged)
    changes = []
    for h, w, seed in NON_SQUARE:
        img = photo(h, w, seed)
        msgs = hf_messages([one_image_turn(img)])
        changes.append(float(np.abs(tuned.last_logits(msgs, [img], N_TOKENS)
                                    - base.last_logits(msgs, [img], N_TOKENS)).max()))
    print("merged vs base torch, max |logit diff| per image:", changes)
    assert min(changes) > 100 * TOLERANCE["f32"], changes  # the fine-tune changed the model, and it survived
