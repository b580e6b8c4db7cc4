"""recipes/minicpm-v-2.yaml and recipes/minicpm-v-2_6.yaml on tiny checkpoints in each published layout
(tests/minicpmv_models.py): `build` -> bundle -> the runtime's (image, prompt) logits through
ChatSession against the torch reference composite, for an image that needs no slicing and one that
needs several slices; `chat --image` on the bundle; one-line errors for bad folders.

Device path (no torch): the bundle's manifest (slicing, markers) -> OpenBMB's slicing in numpy -> the
ONNX vision graph with numpy position tables -> each block of rows at its run of unk tokens ->
llama.cpp on the F32 GGUF (2.0's rows divided by scale_emb). Torch composite: the same slices' pixels
through our torch reference (tower + resampler, its own torch positions) and the LLM in torch (our
MiniCPM reference for 2.0, transformers' Qwen2 for 2.6) on embeddings with the rows in place of the
unk runs, the prompt written out here as the published chat() writes it.
Tolerance: max abs difference of the last-token logits under 2% of their standard deviation
(relative, as the tiny 2.0's logits are small: logits / (hidden / dim_model_base)), top-1 equal.
Measured (2 threads) on the hand-wired path before: 2.0 8e-6 .. 1.7e-5 on a std of 0.037; 2.6 7.8e-3 ..
1.3e-2 on a std of 1.5-1.6 (llama.cpp's f16 KV cache).
The slicing is the published one (scale_resolution 448, max_slice_nums 9, patch 14).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from recipe_builds import build_recipe, bundle_of, cli

from vishwamai_edge.export.minicpm_lm import load_minicpm_lm
from vishwamai_edge.export.minicpmv import read_minicpmv, slicing
from vishwamai_edge.export.minicpmv_vision import load_vision
from vishwamai_edge.export.torch_state import safetensors_state
from vishwamai_edge.runtime.minicpmv_slices import placeholder, plan_slices, slice_pixels
from vishwamai_edge.runtime.prompts import IMAGE_SENTINEL

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"2.0": ROOT / "recipes" / "minicpm-v-2.yaml", "2.6": ROOT / "recipes" / "minicpm-v-2_6.yaml"}
QUESTION = "What is in the picture?"
F32 = ("export.gguf.outtype=f32", "export.gguf.quants=[]", "export.gguf.imatrix=false")
# (height, width): under 448^2 pixels (no slices), and 700 x 1000 (ratio 3.5: a grid of several slices)
SIZES = {"plain": (300, 400), "sliced": (700, 1000)}


def build(variant: str, src: Path, out: Path, *overrides: str, quant: str | None = "f32", target: str = "laptop-cpu",
          expect: int = 0) -> subprocess.CompletedProcess:
    return build_recipe(RECIPES[variant], src, out, *overrides, quant=quant, target=target, expect=expect)


def photo(h: int, w: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def built(tiny_minicpmv, tmp_path_factory):
    """variant -> (source folder, bundle, the build's LLM folder), built once through the recipe."""
    out: dict[str, tuple[Path, Path, Path]] = {}

    def make(variant: str):
        if variant not in out:
            src = tiny_minicpmv(variant)
            root = tmp_path_factory.mktemp(f"minicpmv-build-{variant}")
            build(variant, src, root, *F32)
            name = RECIPES[variant].stem
            out[variant] = (src, bundle_of(root), root / name / "llm-hf")
        return out[variant]

    return make


class Composite:
    """The torch reference: our vision side from the source folder, the LLM from the split folder."""

    def __init__(self, variant: str, src: Path, llm_dir: Path):
        import transformers

        self.variant = variant
        layout = read_minicpmv(src)
        self.slices = slicing(layout)
        self.vision, _ = load_vision(safetensors_state(src, "MiniCPM-V"), layout.config, src)
        if variant == "2.0":
            self.llm = load_minicpm_lm(llm_dir)
            self.embed = self.llm.embed
        else:
            self.llm = transformers.AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
            self.embed = self.llm.get_input_embeddings()
        self.tokenize = reference_tokenizer(llm_dir)

    def prompt(self, image: np.ndarray, question: str) -> str:
        """The prompt as the published chat() writes it for one image and a question."""
        return self.conversation([(question, [image])], [])

    def conversation(self, turns: list[tuple[str, list[np.ndarray]]], answers: list[str]) -> str:
        """The published chat()'s prompt: user turns (images first, each its placeholder and a newline, numbered
        across the conversation) and the answers between them. 2.0 (modeling_minicpmv.py): <用户>content,
        <AI>answer, <AI> to answer; 2.6: ChatML with the tokenizer's default system prompt."""
        out, k = "", 0
        if self.variant == "2.6":
            out = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        for i, (question, images) in enumerate(turns):
            content = ""
            for image in images:
                plan = plan_slices(image.shape[1], image.shape[0], self.slices)
                content += placeholder(plan, self.slices, k) + "\n"
                k += 1
            content += question
            answer = answers[i] if i < len(answers) else None
            if self.variant == "2.0":
                out += f"<用户>{content}<AI>" + (answer if answer is not None else "")
            else:
                out += f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
                out += f"{answer}<|im_end|>\n" if answer is not None else ""
        return out

    def ids(self, text: str) -> list[int]:
        """The prompt's ids with a sentinel per unk run (OpenBMB's processor bounds the runs)."""
        pieces = text.split(self.slices.unk * self.slices.query_num)
        ids = self.tokenize(pieces[0], True)
        for piece in pieces[1:]:
            ids += [IMAGE_SENTINEL] + (self.tokenize(piece, False) if piece else [])
        return ids

    def logits(self, image: np.ndarray | list[np.ndarray], text: str) -> np.ndarray:
        pieces = text.split(self.slices.unk * self.slices.query_num)
        pixels = [p for im in (image if isinstance(image, list) else [image])
                  for p in slice_pixels(im, plan_slices(im.shape[1], im.shape[0], self.slices))]
        assert len(pixels) == len(pieces) - 1
        parts = []
        with torch.no_grad():
            for i, piece in enumerate(pieces):
                ids = self.tokenize(piece, i == 0)
                if ids:
                    parts.append(self.embed(torch.tensor(ids)))
                if i < len(pixels):
                    x = torch.from_numpy(pixels[i].copy()).float().div(255).sub(0.5).div(0.5).permute(2, 0, 1)[None]
                    parts.append(self.vision(x)[0])
            return self.llm(inputs_embeds=torch.cat(parts)[None]).logits[0, -1].numpy()


def reference_tokenizer(llm_dir: Path):
    """piece, first -> ids: the model's own tokenizer. 2.0's is LlamaTokenizerWrapper, the slow sentencepiece
    LlamaTokenizer (tokenizer_config.json: legacy true), whatever tokenizer.json says; 2.6's Qwen2's."""
    import transformers

    sentencepiece = (llm_dir / "tokenizer.model").is_file()
    hf = transformers.AutoTokenizer.from_pretrained(llm_dir, use_fast=not sentencepiece)
    return lambda piece, first: list(hf(piece, add_special_tokens=first)["input_ids"])


def runtime_logits(pipeline, messages: list[dict]) -> tuple[np.ndarray, list[int], int]:
    session = pipeline.session()
    prompt = session.prompt(messages)
    pipeline.llm.prefill(prompt.segments(pipeline.encode_images(prompt.images)))
    return pipeline.llm.logits(), prompt.tokens, prompt.size


def bundle_logits(bundle: Path, messages: list[dict]) -> tuple[np.ndarray, list[int], int]:
    """runtime_logits on the bundle loaded for this call."""
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(bundle, RuntimeOptions(n_threads=2))
    try:
        return runtime_logits(pipeline, messages)
    finally:
        pipeline.close()


@pytest.mark.parametrize("variant", ["2.0", "2.6"])
def test_manifest_carries_the_slicing_and_markers(built, variant):
    _, bundle, _ = built(variant)
    m = json.loads((bundle / "manifest.json").read_text())
    image = m["encoders"]["image"]
    assert image["kind"] == "minicpmv" and (bundle / image["file"]).is_file() and (bundle / image["positions"]).is_file()
    assert image["slicing"] == {"version": variant, "max_slice_nums": 9, "scale_resolution": 448, "patch_size": 14,
                                "query_num": 8, "use_image_id": variant == "2.6"}
    assert image["markers"]["unk"] == "<unk>" and image["n_tokens"] == 8 and image["hidden"] == 256
    assert image["row_divisor"] == (3.0 if variant == "2.0" else 1.0)  # the tiny MiniCPM's scale_emb
    assert image["check"]["max_abs_diff"] < 1e-4 and image["check"]["max_rel_diff"] < 1e-4
    assert m["llm"]["image_token"] == {"text": "(<image>./</image>)", "id": None}
    assert ("<用户>" if variant == "2.0" else "<|im_start|>") in m["llm"]["chat_template"]
    assert m["llm"]["file"] == "llm/model-f32.gguf"


@pytest.mark.parametrize("variant", ["2.0", "2.6"])
@pytest.mark.parametrize("size", ["plain", "sliced"])
def test_bundle_logits_match_torch_composite(built, variant, size):
    src, bundle, llm_dir = built(variant)
    ref = Composite(variant, src, llm_dir)
    image = photo(*SIZES[size])
    n_blocks = 1 + plan_slices(image.shape[1], image.shape[0], ref.slices).n_slices
    assert (n_blocks == 1) == (size == "plain") and n_blocks in (1, 4, 5, 6)
    messages = [{"role": "user", "content": [{"type": "image", "pixels": image}, {"type": "text", "text": QUESTION}]}]
    text = ref.prompt(image, QUESTION)
    if variant == "2.6":
        assert text.count("<image_id>0</image_id>") == 1 and text.count("<slice>") == n_blocks - 1
    else:
        assert text.count("<image>") == n_blocks and text.count("<slice>") == (n_blocks > 1)
    want = ref.logits(image, text)
    got, tokens, positions = bundle_logits(bundle, messages)
    assert tokens == ref.ids(text)
    assert tokens.count(IMAGE_SENTINEL) == n_blocks
    assert positions == len(tokens) + n_blocks * (8 - 1)
    got = got[:len(want)]
    diff = float(np.abs(got - want).max())
    print(f"MiniCPM-V {variant} {size} ({n_blocks} blocks, {positions} positions): max |Δlogit| {diff:.3g}, "
          f"std {float(want.std()):.3g}")
    assert diff < 0.02 * float(want.std()), (diff, float(want.std()))
    assert int(np.argmax(got)) == int(np.argmax(want))


# user turns (question, image sizes) and the answers between them; 2.0's chat() shows images in the first turn only
CONVERSATIONS = {
    "2.0": ([("Describe it.", [(300, 400)]), ("Is it round?", []), ("What colour?", [])], ["A disk.", "Yes."]),
    "2.6": ([("Describe it.", [(300, 400)]), ("And this one?", [(320, 380)])], ["A disk."]),
}


@pytest.mark.parametrize("variant", ["2.0", "2.6"])
def test_multi_turn_prompts_tokenize_and_answer_as_the_published_code(built, variant):
    src, bundle, llm_dir = built(variant)
    ref = Composite(variant, src, llm_dir)
    questions, answers = CONVERSATIONS[variant]
    turns = [(q, [photo(h, w, 10 + i) for h, w in sizes]) for i, (q, sizes) in enumerate(questions)]
    messages = []
    for i, (question, images) in enumerate(turns):
        messages.append({"role": "user", "content": [*({"type": "image", "pixels": im} for im in images),
                                                     {"type": "text", "text": question}]})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    text = ref.conversation(turns, answers)
    want = ref.logits([im for _, images in turns for im in images], text)
    got, tokens, _ = bundle_logits(bundle, messages)
    assert tokens == ref.ids(text)
    got = got[:len(want)]
    assert float(np.abs(got - want).max()) < 0.02 * float(want.std())
    assert int(np.argmax(got)) == int(np.argmax(want))


def test_second_turn_numbers_images_and_keeps_the_first(built):
    """2.6: each image of a conversation gets its own <image_id>, and its rows stay at their runs."""
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    _, bundle, _ = built("2.6")
    pipeline = Pipeline.load(bundle, RuntimeOptions(n_threads=2))
    try:
        session = pipeline.session(max_tokens=4)
        a, b = photo(300, 400, 1), photo(700, 1000, 2)
        reply = "".join(session.ask(QUESTION, images=[a]))
        assert session.last_stats.images == 1
        "".join(session.ask("And this one?", images=[b]))
        prompt = session.prompt(session.messages[:-1])
        blocks = 1 + plan_slices(1000, 700, pipeline.encoders["image"].slices).n_slices
        assert prompt.blocks_per_image == [1, blocks]
        assert prompt.tokens.count(IMAGE_SENTINEL) == 1 + blocks
        assert session.last_stats.prompt_tokens == prompt.size
        assert isinstance(reply, str)
    finally:
        pipeline.close()


@pytest.mark.parametrize("variant", ["2.0", "2.6"])
def test_chat_image_on_the_bundle(built, variant, tmp_path):
    from PIL import Image

    _, bundle, _ = built(variant)
    image = tmp_path / "photo.png"
    Image.fromarray(photo(700, 1000, 7)).save(image)
    proc = cli("chat", str(bundle), "--image", str(image), "--prompt", QUESTION, "--max-tokens", "6",
               "--threads", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


# -- the Q4_K_M bundle of the recipe's default ------------------------------------------------------


@pytest.mark.slow
def test_default_quant_bundle_for_orin(tiny_minicpmv, tmp_path):
    """orin-nx-16 with the recipe as it is: Q4_K_M, fp32 vision graph, CUDA first for ONNX Runtime."""
    build("2.0", tiny_minicpmv("2.0"), tmp_path, quant=None, target="orin-nx-16")
    m = json.loads((bundle_of(tmp_path) / "manifest.json").read_text())
    assert m["llm"]["quant"] == "q4_k_m" and m["encoders"]["image"]["kind"] == "minicpmv"
    assert m["encoders"]["image"]["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert m["memory_plan"]["fits"] is True and "engines" not in m


# -- bad input -----------------------------------------------------------------------------------


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_missing_resampler_tensors(tiny_minicpmv, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "MiniCPM-V-2"
    shutil.copytree(tiny_minicpmv("2.0"), broken)
    state = load_file(str(broken / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("resampler.")}, str(broken / "model.safetensors"))
    _one_line_error(build("2.0", broken, tmp_path / "b", *F32, expect=2), "resampler.query", "no resampler tensors")


def test_unknown_version(tiny_minicpmv, tmp_path):
    broken = tmp_path / "MiniCPM-V-2_6"
    shutil.copytree(tiny_minicpmv("2.6"), broken)
    config = json.loads((broken / "config.json").read_text())
    config["version"] = 9.5
    (broken / "config.json").write_text(json.dumps(config))
    _one_line_error(build("2.6", broken, tmp_path / "b", *F32, expect=2), "version 9.5", "not supported", "2.0", "2.6")


def test_the_2_0_folder_with_auto_map_builds_without_remote_code(built):
    """The published tokenizer_config.json names OpenBMB's tokenizer by `auto_map` (remote code). The build,
    stdin closed, ran without asking; the LLM folder it made names transformers' own class instead."""
    src, _, llm = built("2.0")
    assert json.loads((src / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizerWrapper"
    split = json.loads((llm / "tokenizer_config.json").read_text())
    assert "auto_map" not in split and split["tokenizer_class"] == "LlamaTokenizer" and split["legacy"] is True


def test_an_unknown_2_0_tower_is_one_line(tiny_minicpmv, tmp_path):
    broken = tmp_path / "MiniCPM-V-2"
    shutil.copytree(tiny_minicpmv("2.0"), broken)
    config = json.loads((broken / "config.json").read_text())
    config["vision_encoder"] = "vit_giant_patch14_dinov2"
    (broken / "config.json").write_text(json.dumps(config))
    _one_line_error(build("2.0", broken, tmp_path / "b", *F32, expect=2), "vision_encoder",
                    "vit_giant_patch14_dinov2", "not a tower")


def test_fp16_vision_refused(tiny_minicpmv, tmp_path):
    _one_line_error(build("2.0", tiny_minicpmv("2.0"), tmp_path, *F32, "export.vision.dtype=fp16", expect=2),
                    "export.vision.dtype", "fp32")


def test_api_answers_a_sliced_image_as_the_session_does(built, tmp_path):
    """`serve` (a real process on 127.0.0.1) on the 2.6 bundle: an image that needs slices, sent as a
    data URL, gets the in-process session's greedy answer and the same prompt size."""
    import base64
    import io

    import httpx
    from PIL import Image
    from serve_process import start_server, stop_server
    from vlm_bundles import in_process_answers

    _, bundle, _ = built("2.6")
    image = photo(700, 1000, 5)
    (want,) = in_process_answers(bundle, [(QUESTION, [image])], 6)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    live = start_server(bundle, tmp_path / "server.log")
    try:
        body = {"model": live.model, "max_tokens": 6, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": QUESTION}]}]}
        r = httpx.post(live.base_url + "/chat/completions", json=body, timeout=120)
    finally:
        stop_server(live)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want
    # overview + 4 slices of 8 rows, each run one position per row
    assert r.json()["usage"]["prompt_tokens"] > 5 * 8
