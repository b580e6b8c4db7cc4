"""Vision-language models end to end on tiny random LLaVAs: a folder as a user downloads it ->
`build` (language model to GGUF, vision tower + projector to ONNX) -> bundle -> the runtime's
logits for (image, prompt) against transformers' LlavaForConditionalGeneration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vision_models import build_tiny_llava_chat

# max |logit difference| at the last position, on logits of about +-1 (the tiny models' scale):
# F32 GGUF + fp32 ONNX differ by llama.cpp's f16 KV cache; F16 + fp16 add their weight rounding.
TOLERANCE = {"f32": 5e-3, "f16": 2e-2}
QUESTION = "What is in this picture?"


def photo(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def llava_dirs(tmp_path_factory, tokenizer_dirs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llava")
    return {
        # LLaVA-1.5's layout: CLIP, the second-to-last layer, CLS dropped
        "clip": build_tiny_llava_chat(root / "clip", tokenizer_dirs["llama3"], tower="clip"),
        # SigLIP, no CLS, all tokens kept, another feature layer
        "siglip": build_tiny_llava_chat(root / "siglip", tokenizer_dirs["llama3"], tower="siglip",
                                        vision_feature_layer=-3, select_strategy="full"),
    }


def build_bundle(src: Path, out: Path, outtype: str, dtype: str) -> Path:
    from rich.console import Console

    from vishwamai_edge.build import build
    from vishwamai_edge.recipe import load_recipe
    from vishwamai_edge.targets import get_target

    recipe = out / "recipe.yaml"
    out.mkdir(parents=True, exist_ok=True)
    recipe.write_text(
        f"name: tiny-llava\nsource: {{kind: hf, path: {src}}}\n"
        f"export:\n  gguf: {{outtype: {outtype}, quants: [], imatrix: false}}\n  vision: {{dtype: {dtype}}}\n"
    )
    result = build(load_recipe(recipe), get_target("laptop-cpu"), out / "build", quant=outtype,
                   console=Console(stderr=True, quiet=True))
    return result.bundle


@pytest.fixture(scope="module")
def bundles(llava_dirs, tmp_path_factory) -> dict[tuple[str, str], Path]:
    out = {}
    for tower, src in llava_dirs.items():
        for outtype, dtype in (("f32", "fp32"), ("f16", "fp16")):
            out[tower, outtype] = build_bundle(src, tmp_path_factory.mktemp(f"{tower}-{outtype}"), outtype, dtype)
    return out


class Reference:
    """transformers' LLaVA on a folder: the prompt rendered by its template, its processor's pixels."""

    def __init__(self, src: Path):
        import torch
        import transformers as T

        self.torch = torch
        self.model = T.LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
        self.tokenizer = T.AutoTokenizer.from_pretrained(src)
        self.processor = T.AutoImageProcessor.from_pretrained(src)

    def last_logits(self, messages: list[dict], images: list[np.ndarray], n_tokens: int) -> np.ndarray:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = []
        for i in self.tokenizer(text)["input_ids"]:  # the processor's expansion of each placeholder
            ids += [i] * n_tokens if i == self.model.config.image_token_index else [i]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        with self.torch.no_grad():
            out = self.model(input_ids=self.torch.tensor([ids]), pixel_values=pixels)
        return out.logits[0, -1].numpy()


def runtime_logits(pipeline, messages: list[dict]) -> np.ndarray:
    session = pipeline.session()
    prompt = session.prompt(messages)
    embeddings = pipeline.encoders["image"].encode(prompt.images)
    pipeline.llm.prefill(prompt.segments(embeddings))
    return pipeline.llm.logits()


def hf_messages(messages: list[dict]) -> list[dict]:
    return [{**m, "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
            for m in messages]


def conversation(questions: list[tuple[str, int]], answers: list[str], images: list[np.ndarray],
                 answer_parts: bool = False) -> list[dict]:
    """Chat messages of user turns (text, how many of `images` it shows first, in order) with the answers
    between them (as text parts with `answer_parts`, as the llava-hf template reads them)."""
    messages, k = [], 0
    for i, (question, n) in enumerate(questions):
        parts = [{"type": "image", "pixels": images[k + j]} for j in range(n)]
        k += n
        messages.append({"role": "user", "content": [*parts, {"type": "text", "text": question}]})
        if i < len(answers):
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answers[i]}] if answer_parts
                             else answers[i]})
    return messages


def one_image_turn(img: np.ndarray, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [{"type": "image", "pixels": img}, {"type": "text", "text": text}]}


@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_runtime_logits_equal_transformers(llava_dirs, bundles, tower, outtype):
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    ref = Reference(llava_dirs[tower])
    pipeline = Pipeline.load(bundles[tower, outtype], RuntimeOptions(n_threads=2))
    try:
        n = pipeline.encoders["image"].n_tokens
        for h, w, seed in ((45, 29, 0), (30, 30, 1), (17, 80, 2)):  # tall, square, wide
            img = photo(h, w, seed)
            messages = [one_image_turn(img)]
            want = ref.last_logits(hf_messages(messages), [img], n)
            got = runtime_logits(pipeline, messages)
            assert np.abs(got - want).max() < TOLERANCE[outtype], (h, w, np.abs(got - want).max())
            assert got.argmax() == want.argmax()
    finally:
        pipeline.close()


def test_two_images_in_two_turns(llava_dirs, bundles):
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    ref = Reference(llava_dirs["clip"])
    pipeline = Pipeline.load(bundles["clip", "f32"], RuntimeOptions(n_threads=2))
    try:
        a, b = photo(40, 60, 3), photo(50, 20, 4)
        messages = [one_image_turn(a, "Describe it."),
                    {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
                    {"role": "user", "content": [{"type": "text", "text": "And now"},
                                                 {"type": "image", "pixels": b}]}]
        want = ref.last_logits(hf_messages(messages), [a, b], pipeline.encoders["image"].n_tokens)
        got = runtime_logits(pipeline, messages)
        assert np.abs(got - want).max() < TOLERANCE["f32"]
    finally:
        pipeline.close()


def test_image_positions_are_never_a_shared_prefix(bundles):
    # the same text with another image must not reuse the first image's KV rows
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(bundles["clip", "f32"], RuntimeOptions(n_threads=2))
    try:
        a, b = photo(30, 30, 5), photo(30, 30, 6)
        runtime_logits(pipeline, [one_image_turn(a)])
        after_a = runtime_logits(pipeline, [one_image_turn(b)])
        pipeline.llm.reset()
        fresh = runtime_logits(pipeline, [one_image_turn(b)])
        assert np.abs(after_a - fresh).max() < 1e-4
        assert np.abs(fresh - runtime_logits(pipeline, [one_image_turn(a)])).max() > 1e-3  # images matter
    finally:
        pipeline.close()


def test_manifest_lists_encoder_checks_and_mmproj(bundles):
    manifest = json.loads((bundles["clip", "f16"] / "manifest.json").read_text())
    entry = manifest["encoders"]["image"]
    assert entry["file"] == "encoders/vision-fp16.onnx" and entry["file"] in manifest["files"]
    assert entry["n_tokens"] == 25 and entry["hidden"] == 64 and entry["dtype"] == "fp16"
    assert entry["preprocess"]["kind"] == "clip" and entry["providers"] == ["CPUExecutionProvider"]
    assert manifest["checks"]["vision"]["max_rel_diff"] < 1e-2
    assert manifest["llm"]["image_token"]["text"] == "<image>"
    assert manifest["mmproj"]["file"] in manifest["files"]
    siglip = json.loads((bundles["siglip", "f32"] / "manifest.json").read_text())
    assert "mmproj" not in siglip  # llama.cpp's LLaVA projector takes CLIP towers only


def test_more_images_than_the_context_holds(bundles):
    from vishwamai_edge.errors import ContextOverflowError
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(bundles["clip", "f32"], RuntimeOptions(n_ctx=64, n_threads=2))
    try:
        session = pipeline.session(max_tokens=4)
        n_ctx = pipeline.llm.n_ctx  # llama.cpp may round the context up
        too_many = n_ctx // pipeline.encoders["image"].n_tokens + 1
        with pytest.raises(ContextOverflowError, match=f"context holds {n_ctx}"):
            "".join(session.ask("Compare them.", images=[photo(30, 30, i) for i in range(too_many)]))
        assert "".join(session.ask("hi", images=[photo(30, 30, 9)]))  # the session still works
    finally:
        pipeline.close()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_chat_image_command(bundles, tmp_path):
    from PIL import Image

    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    img = photo(45, 29, 7)
    Image.fromarray(img).save(tmp_path / "pic.png")
    proc = cli("chat", str(bundles["clip", "f32"]), "--image", str(tmp_path / "pic.png"), "-p", QUESTION,
               "--max-tokens", "12", "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    pipeline = Pipeline.load(bundles["clip", "f32"], RuntimeOptions(n_threads=2))
    try:
        direct = "".join(pipeline.session(max_tokens=12).ask(QUESTION, images=[img]))
    finally:
        pipeline.close()
    assert proc.stdout.strip() == direct.strip() and direct.strip()
    assert "1 image(s) encoded" in proc.stderr


@pytest.mark.parametrize("content, message", [
    (b"this is a text file", "not an image"),
    (None, "does not exist"),
])
def test_chat_image_bad_files(bundles, tmp_path, content, message):
    path = tmp_path / "x.png"
    if content is not None:
        path.write_bytes(content)
    proc = cli("chat", str(bundles["clip", "f32"]), "--image", str(path), "-p", "hi")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert message in lines[0] and "x.png" in lines[0]


def test_truncated_png_and_image_to_a_text_bundle(bundles, embedded_bundle, tmp_path):
    from PIL import Image

    path = tmp_path / "cut.png"
    Image.fromarray(photo(64, 64, 8)).save(path)
    path.write_bytes(path.read_bytes()[:400])
    proc = cli("chat", str(bundles["clip", "f32"]), "--image", str(path), "-p", "hi")
    assert proc.returncode == 2 and "cannot be decoded" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("chat", str(embedded_bundle), "--image", str(path), "-p", "hi")
    assert proc.returncode == 2 and "no image encoder" in proc.stderr


def test_profile_image_scenario(bundles, tmp_path):
    from rich.console import Console

    from vishwamai_edge.profile import run_profile
    from vishwamai_edge.runtime.options import RuntimeOptions

    result = run_profile([bundles["clip", "f16"]], tmp_path / "profile", "chat,image", repeat=2, warmup=1, target=None, decode_tokens=8, console=Console(stderr=True, quiet=True), options=RuntimeOptions(n_threads=2, n_ctx=None))
    image = result.report["bundles"][0]["scenarios"]["image"]
    assert image["status"] == "ok", image
    for run in image["runs"]:  # each run encodes the image again (no cached rows)
        assert run["encode_s"] > 0 and run["ttft_s"] > run["encode_s"]
        assert run["prompt_tokens"] > 25  # the image's 25 rows are counted in the prompt
    md = (result.out_dir / "report.md").read_text()
    assert "| image |" in md or "image" in md


def test_an_image_resent_in_later_turns_is_encoded_once(bundles):
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(bundles["clip", "f32"], RuntimeOptions(n_threads=2))
    try:
        calls = []
        encoder = pipeline.encoders["image"]
        original = encoder.encode
        encoder.encode = lambda images: calls.append(len(images)) or original(images)
        session = pipeline.session(max_tokens=4)
        img = photo(30, 40, 11)
        first = "".join(session.ask("What is it?", images=[img]))
        "".join(session.ask("And its colour?"))  # the first turn's image is in the prompt again
        assert calls == [1] and session.last_stats.images == 1
        fresh = pipeline.session(max_tokens=4)
        pipeline.forget_images()
        assert "".join(fresh.ask("What is it?", images=[img])) == first  # cached rows are the same rows
    finally:
        pipeline.close()


def test_jetson_build_prints_and_records_its_memory_plan(llava_dirs, tmp_path):
    from rich.console import Console

    from vishwamai_edge.build import build
    from vishwamai_edge.recipe import load_recipe
    from vishwamai_edge.targets import get_target

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: tiny-llava\nsource: {{kind: hf, path: {llava_dirs['clip']}}}\n"
                      "export:\n  gguf: {outtype: f16, quants: [], imatrix: false}\n"
                      "  engines: {enabled: false}\n")  # AWQ of a random model: tests/test_engines_build.py
    console = Console(record=True, width=300)
    result = build(load_recipe(recipe), get_target("orin-nano-8"), tmp_path / "out", quant="f16", console=console)
    assert "memory plan: tiny-llava f16 on orin-nano-8" in console.export_text()
    plan = result.manifest["memory_plan"]
    assert plan["fits"] and plan["available_gb"] == 6.5 and plan["encoder_gb"] >= 0.3  # ONNX Runtime's share
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    assert manifest["encoders"]["image"]["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
