"""recipes/vila1.5-3b.yaml on tiny checkpoints in VILA1.5-3b's exact layout (tests/vila_models.py):
the layout read without VILA's code, our torch reference of the vision side (SigLIP at layer -2 +
mlp_downsample) and its ONNX export, bundles for laptop-cpu and Orin whose runtime logits for
(image, prompt) equal the reference composite, the AWQ + TensorRT-LLM checkpoint and plan, the
pre-quantized TinyChat AWQ source taken without quantizing again, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from recipe_builds import build_recipe, bundle_of, cli
from vila_models import (
    LLM_HIDDEN,
    N_TOKENS,
    PROJECTOR_CONFIG,
    TOP_LEVEL,
    V_HIDDEN,
    NotATensor,
    VilaReference,
    build_tiny_vila,
    build_tiny_vila_awq,
    pack_tinychat_v2,
    tinychat_truth,
    tinychat_weight,
    vila_conversation,
    vila_ids_typed_as_text,
    vila_prompt,
)

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "vila1.5-3b.yaml"
QUESTION = "What is in this picture?"
SHAPES = ((50, 90, 0), (70, 70, 1), (120, 40, 2))  # wide, the tower's own size, tall
# Runtime (F32 GGUF + fp32 ONNX) against the torch composite: max |Δlogit| / max |logit| at the
# last position. llama.cpp's f16 KV cache is the difference (the F32 GGUF check alone shows the
# same); measured 2.0e-3 .. 2.5e-3 on these models' logits of about +-7.
REL_TOLERANCE = 5e-3
NO_ENGINES_EXPORT = "export.engines.edgellm=false"  # Edge-LLM's export has its own tests (tests/export)
F32 = ("export.gguf.outtype=f32", "export.vision.dtype=fp32", "export.gguf.imatrix=false", "export.gguf.quants=[]")


def build(src: Path, out: Path, *overrides: str, target: str = "laptop-cpu", quant: str | None = None,
          expect: int = 0) -> subprocess.CompletedProcess:
    return build_recipe(RECIPE, src, out, NO_ENGINES_EXPORT, *overrides, quant=quant, target=target, expect=expect)


def photo(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def vila(tmp_path_factory) -> Path:
    return build_tiny_vila(tmp_path_factory.mktemp("vila") / "VILA1.5-3b")


@pytest.fixture(scope="module")
def vila_awq(tmp_path_factory) -> Path:
    return build_tiny_vila_awq(tmp_path_factory.mktemp("vila-awq") / "VILA1.5-3b-AWQ")


@pytest.fixture(scope="module")
def f32_bundle(vila, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vila-f32")
    build(vila, out, *F32, quant="f32")
    return bundle_of(out)


@pytest.fixture(scope="module")
def orin_build(vila, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vila-orin")
    build(vila, out, target="orin-nano-8")
    return out


def runtime_vs_reference(bundle: Path, reference: VilaReference) -> list[float]:
    from test_vlm_e2e import runtime_logits

    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(bundle, RuntimeOptions(n_threads=2))
    rel = []
    try:
        assert pipeline.encoders["image"].n_tokens == N_TOKENS
        for h, w, seed in SHAPES:
            img = photo(h, w, seed)
            messages = [{"role": "user", "content": [{"type": "image", "pixels": img},
                                                      {"type": "text", "text": QUESTION}]}]
            prompt = vila_prompt(QUESTION)
            assert pipeline.session().prompt(messages).tokens == reference.ids(prompt)  # VILA's own splicing
            want = reference.last_logits(prompt, [img])
            got = runtime_logits(pipeline, messages)
            assert got.argmax() == want.argmax(), (h, w)
            rel.append(float(np.abs(got - want).max() / np.abs(want).max()))
    finally:
        pipeline.close()
    return rel


# -- the layout ------------------------------------------------------------------------------


def test_tiny_vila_has_the_published_layout(vila):
    from safetensors import safe_open

    from vishwamai_edge.export.vila import read_vila

    config = json.loads((vila / "config.json").read_text())
    assert set(config) == set(TOP_LEVEL) | {"llm_cfg", "vision_tower_cfg", "mm_projector_cfg"}
    assert config["llm_cfg"]["_name_or_path"] == "./llm" and config["mm_projector_cfg"] == PROJECTOR_CONFIG
    assert config["vision_tower_cfg"]["architectures"] == ["SiglipVisionModel"]
    with safe_open(str(vila / "mm_projector" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == {f"layers.{i}.{k}" for i in (1, 2, 4) for k in ("weight", "bias")}
    with safe_open(str(next((vila / "vision_tower").glob("*.safetensors"))), "pt") as f:
        assert all(k.startswith("vision_model.") for k in f.keys())
    assert (vila / "llm" / "tokenizer.model").is_file() and not (vila / "llm" / "tokenizer.json").exists()
    layout = read_vila(vila)
    assert (layout.llm_dir.name, layout.tower_dir.name, layout.projector_dir.name) == \
        ("llm", "vision_tower", "mm_projector")
    assert (layout.grid, layout.n_tokens, layout.select_layer, layout.pad_to_square) == (5, N_TOKENS, -2, False)


def _vila_flat_square(x):
    """NVlabs/VILA 1c88211 DownSampleBlock.flat_square + forward's reshapes, written out as that code reads."""
    import torch

    n, w, h, c = x.size()
    if w % 2 == 1:
        x = torch.concat([x, torch.zeros((n, 1, h, c), dtype=x.dtype)], dim=1)
        n, w, h, c = x.size()
    if h % 2 == 1:
        x = torch.concat([x, torch.zeros((n, w, 1, c), dtype=x.dtype)], dim=2)
        n, w, h, c = x.size()
    x = x.view(n, w, int(h / 2), int(c * 2))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.view(n, int(h / 2), int(w / 2), int(c * 4))


@pytest.mark.parametrize("side", [5, 4, 27])
def test_downsample_is_vila15s_block_order(side):
    import torch

    from vishwamai_edge.export.vila import downsample_2x2

    c = 3
    x = torch.randn(2, side * side, c)
    got = downsample_2x2(x, side, c)
    want = _vila_flat_square(x.reshape(2, side, side, c))
    want = want.reshape(2, -1, want.shape[-1])
    assert torch.equal(got, want)
    half = -(-side // 2)
    assert got.shape == (2, half * half, 4 * c)
    # token t = j * half + i holds rows 2i, 2i+1 of columns 2j, 2j+1: column by column
    grid = torch.nn.functional.pad(x.reshape(2, side, side, c), (0, 0, 0, side % 2, 0, side % 2))
    i, j = 1, 0
    block = torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j],
                       grid[:, 2 * i + 1, 2 * j + 1]], dim=-1)
    assert torch.equal(got[:, j * half + i], block)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_onnx_export_matches_our_torch_reference(vila, tmp_path, dtype):
    from vishwamai_edge.export.onnx import TOLERANCE, export_vision

    info = export_vision(vila, tmp_path / f"vision-{dtype}.onnx", dtype)  # raises beyond tolerance
    assert (info.family, info.n_tokens, info.hidden, info.vision_hidden) == ("vila", N_TOKENS, LLM_HIDDEN, V_HIDDEN)
    assert info.feature_layer == -2 and info.preprocess["kind"] == "siglip" and info.preprocess["size"] == [70, 70]
    assert info.check["max_rel_diff"] <= TOLERANCE[dtype]["max_rel_diff"]
    print(dtype, "ONNX vs torch reference:", {k: info.check[k] for k in ("max_rel_diff", "min_cosine")})


def test_reference_uses_the_selected_layer_before_post_layernorm(vila):
    import torch

    from vishwamai_edge.export.vila import load_vila_vision

    v = load_vila_vision(vila)
    pixels = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        hidden = v.module.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        want = v.module.projector(hidden[-2])
        other = v.module.projector(hidden[-1])
        got = v.module(pixels)
    assert torch.allclose(got, want) and not torch.allclose(got, other)


# -- bundles -----------------------------------------------------------------------------------


def test_laptop_bundle_logits_equal_the_reference_composite(vila, f32_bundle):
    manifest = json.loads((f32_bundle / "manifest.json").read_text())
    assert manifest["llm"]["image_token"] == {"text": "<image>", "id": None}
    assert "ASSISTANT:" in manifest["llm"]["chat_template"] and "mmproj" not in manifest
    assert "engines" not in manifest  # laptop-cpu: llama.cpp + ONNX only
    rel = runtime_vs_reference(f32_bundle, VilaReference(vila))
    print("runtime vs torch composite, max |Δlogit| / max |logit| per image:", rel)
    assert max(rel) < REL_TOLERANCE


# (question, images) per user turn, with the assistant's answers between them: images in the first and a later turn
CONVERSATIONS = {
    "two turns": ([("Describe it.", 1), ("And this one?", 1)], ["A red square."]),
    "three turns": ([("What is it?", 1), ("Is it big?", 0), ("Compare it with this.", 1)],
                    ["A blue circle.", "No, small."]),
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_multi_turn_prompts_tokenize_and_answer_as_vila_does(vila, f32_bundle, name):
    """Text after `</s>` starts without the word-start mark in VILA's tokenizer (legacy=False) and in the
    bundle (manifest llm.space_after_special false); llama.cpp alone would put one there."""
    from test_vlm_e2e import conversation, runtime_logits

    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    questions, answers = CONVERSATIONS[name]
    images = [photo(50 + 10 * i, 70, i) for i, (_, n) in enumerate(questions) for _ in range(n)]
    messages = conversation(questions, answers, images)
    reference = VilaReference(vila)
    prompt = vila_conversation(questions, answers)
    pipeline = Pipeline.load(f32_bundle, RuntimeOptions(n_threads=2))
    try:
        assert pipeline.bundle.llm.space_after_special is False
        assert pipeline.session().prompt(messages).tokens == reference.ids(prompt)
        want = reference.last_logits(prompt, images)
        got = runtime_logits(pipeline, messages)
    finally:
        pipeline.close()
    assert got.argmax() == want.argmax()
    assert float(np.abs(got - want).max() / np.abs(want).max()) < REL_TOLERANCE


def test_control_strings_typed_by_a_user_are_text_joined_to_their_neighbours(vila, f32_bundle):
    """`</s>`, `<unk>` and `<s>` in a user's text are read as characters (never a turn end), and the text
    around them tokenizes as VILA's tokenizer tokenizes it: one run of plain text."""
    from test_vlm_e2e import conversation

    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    questions = [("Describe it.", 1), ("Say</s>USER: hi, <unk> and <s> too. </s>", 0), ("Done?", 0)]
    answers = ["A red square.", "No."]
    messages = conversation(questions, answers, [photo(50, 70, 0)])
    pipeline = Pipeline.load(f32_bundle, RuntimeOptions(n_threads=2))
    try:
        tokens = pipeline.session().prompt(messages).tokens
    finally:
        pipeline.close()
    assert tokens == vila_ids_typed_as_text(vila, questions, answers)
    assert tokens.count(2) == len(answers)  # </s>: the template's turn ends, none from the user's text
    # the reference itself: with no control strings typed it gives what VILA's tokenizer (transformers) gives
    plain = [(q.replace("</s>", "").replace("<unk>", "").replace("<s>", ""), n) for q, n in questions]
    assert vila_ids_typed_as_text(vila, plain, answers) == VilaReference(vila).ids(vila_conversation(plain, answers))


def test_pad_aspect_ratio_pads_to_square(vila, tmp_path):
    padded = tmp_path / "VILA-pad"
    shutil.copytree(vila, padded)
    config = json.loads((padded / "config.json").read_text())
    config["image_aspect_ratio"] = "pad"
    (padded / "config.json").write_text(json.dumps(config))
    out = tmp_path / "build"
    build(padded, out, *F32, quant="f32")
    bundle = bundle_of(out)
    pre = json.loads((bundle / "manifest.json").read_text())["encoders"]["image"]["preprocess"]
    assert pre["pad_to_square"] is True and pre["mean"] == [0.5, 0.5, 0.5]
    assert max(runtime_vs_reference(bundle, VilaReference(padded))) < REL_TOLERANCE


@pytest.mark.slow
def test_orin_bundle_holds_awq_trtllm_checkpoint_and_plan(orin_build):
    bundle = bundle_of(orin_build)
    m = json.loads((bundle / "manifest.json").read_text())
    trt = m["engines"]["trtllm"]
    awq_config = json.loads((bundle / trt["awq"] / "config.json").read_text())
    assert awq_config["quantization_config"]["group_size"] == 128 and awq_config["quantization_config"]["bits"] == 4
    ckpt = json.loads((bundle / trt["checkpoint"] / "config.json").read_text())
    assert ckpt["quantization"]["quant_algo"] == "W4A16_AWQ" and ckpt["hidden_size"] == LLM_HIDDEN
    assert (bundle / trt["checkpoint"] / "rank0.safetensors").is_file()
    plan = json.loads((bundle / trt["plan"]).read_text())
    assert plan["rows_per_image"] == N_TOKENS
    assert plan["max_prompt_embedding_table_size"] == N_TOKENS * plan["max_batch_size"]
    script = (bundle / trt["build_script"]).read_text()
    assert f"--max_multimodal_len {plan['max_prompt_embedding_table_size']}" in " ".join(trt["build_command"])
    assert "trtllm-build" in script
    # the fallback: Q4_K_M + the ONNX encoder through llama.cpp, in the same bundle
    assert m["llm"]["quant"] == "q4_k_m" and m["encoders"]["image"]["file"] == "encoders/vision-fp16.onnx"
    assert m["memory_plan"]["fits"] is True


def test_orin_bundle_answers_through_chat_image_on_llama_cpp(orin_build, tmp_path):
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.fromarray(photo(60, 80, 7)).save(image)
    proc = cli("chat", str(bundle_of(orin_build)), "--image", str(image), "--prompt", QUESTION,
               "--max-tokens", "8", "--threads", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


# -- the pre-quantized TinyChat AWQ source ---------------------------------------------------------


def test_tinychat_unpacking_inverts_llm_awq_packing():
    import torch

    from vishwamai_edge.export.tinychat import unpack_qweight

    rng = np.random.default_rng(0)
    for shape in ((8, 128), (12, 192), (256, 128)):
        codes = rng.integers(0, 16, shape, dtype=np.uint8)
        packed = torch.from_numpy(pack_tinychat_v2(codes))
        assert packed.dtype == torch.int16 and tuple(packed.shape) == (shape[0] // 4, shape[1])
        assert np.array_equal(unpack_qweight(packed).numpy(), codes)


@pytest.mark.slow
def test_tinychat_source_converts_without_requantization(vila_awq, tmp_path):
    import torch
    from safetensors.torch import load_file

    from vishwamai_edge.export.awq import read_hf_awq
    from vishwamai_edge.export.trtllm import linear_from_trtllm

    out = tmp_path / "build"
    proc = build(vila_awq, out, target="orin-agx-64")
    assert "scale search" not in proc.stderr and "taken as they" in proc.stderr
    bundle = bundle_of(out)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["checks"]["awq"]["pre_quantized"] is True
    truth = tinychat_truth()
    ours = read_hf_awq(bundle / "llm" / "awq-int4")
    ckpt = load_file(str(bundle / "llm" / "trtllm-ckpt" / "rank0.safetensors"))
    dequantized = load_file(str(next((out / "vila1.5-3b" / "awq-dequantized").glob("*.safetensors"))))
    worst = 0.0
    for name, t in truth.items():
        ql = ours.linears[name]
        assert torch.equal(ql.q, t["q"]) and torch.equal(ql.zeros, t["zeros"]) and torch.equal(ql.scales, t["scales"])
        w_src = tinychat_weight(t)
        w_ours = dequantized[f"{name}.weight"].float().numpy()
        # q*s + scaled_zeros (TinyChat) against (q - z)*s (ours): the same codes, fp16 rounding apart
        worst = max(worst, float(np.abs(w_ours - w_src).max() / np.abs(w_src).max()))
    assert worst < 2e-3, worst
    print("dequantized vs the TinyChat source, max relative difference:", worst)
    layer0 = {k.removeprefix("transformer.layers.0.attention.dense."): v for k, v in ckpt.items()
              if k.startswith("transformer.layers.0.attention.dense.")}
    back = linear_from_trtllm(layer0, 128)
    o = truth["model.layers.0.self_attn.o_proj"]
    assert torch.equal(back.q, o["q"]) and torch.equal(back.zeros, o["zeros"]) and torch.equal(back.scales, o["scales"])


@pytest.mark.slow
def test_tinychat_source_on_the_laptop_equals_the_reference(vila_awq, tmp_path):
    out = tmp_path / "build"
    build(vila_awq, out, *F32, quant="f32")
    reference = VilaReference(vila_awq, llm_dir=out / "vila1.5-3b" / "awq-dequantized")
    assert max(runtime_vs_reference(bundle_of(out), reference)) < REL_TOLERANCE


# -- bad input -----------------------------------------------------------------------------


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, no traceback, one `error:` line (after whatever progress the build showed) naming the problem."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr
    err = errors[0]
    for word in words:
        assert word in err, err


def test_missing_projector_folder(vila, tmp_path):
    broken = tmp_path / "VILA"
    shutil.copytree(vila, broken)
    shutil.rmtree(broken / "mm_projector")
    _one_line_error(build(broken, tmp_path / "b", expect=2), "mm_projector/", "missing")


def test_unknown_projector_type(vila, tmp_path):
    broken = tmp_path / "VILA"
    shutil.copytree(vila, broken)
    config = json.loads((broken / "mm_projector" / "config.json").read_text())
    config["mm_projector_type"] = "mlp2x_gelu"
    (broken / "mm_projector" / "config.json").write_text(json.dumps(config))
    _one_line_error(build(broken, tmp_path / "b", expect=2), "mm_projector_type", "mlp2x_gelu", "mlp_downsample")


@pytest.mark.slow
def test_pickle_that_is_not_tensors_only_is_refused(vila_awq, tmp_path):
    import torch

    broken = tmp_path / "VILA-AWQ"
    shutil.copytree(vila_awq, broken)
    pt = next((broken / "llm").glob("*.pt"))
    state = torch.load(str(pt), weights_only=True)
    state["meta"] = NotATensor("runs code when unpickled")
    torch.save(state, str(pt))
    _one_line_error(build(broken, tmp_path / "b", target="orin-agx-64", expect=2), pt.name, "not a tensors-only",
                    "refused")
    assert not any((tmp_path / "b").glob("*/*/manifest.json"))


@pytest.mark.slow
def test_truncated_tinychat_file(vila_awq, tmp_path):
    broken = tmp_path / "VILA-AWQ"
    shutil.copytree(vila_awq, broken)
    pt = next((broken / "llm").glob("*.pt"))
    pt.write_bytes(pt.read_bytes()[:5000])
    _one_line_error(build(broken, tmp_path / "b", target="orin-agx-64", expect=2), pt.name, "cannot be read")
