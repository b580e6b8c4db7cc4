"""MiniCPM-V (image, prompt) -> last-token logits: the device path against the torch composite.

Device path (no torch): OpenBMB's slicing (runtime/minicpmv_slices.py) -> numpy pixels -> the ONNX
vision graph with numpy position tables -> rows spliced between the prompt's text pieces -> llama.cpp
on the split LLM's F32 GGUF (2.0's rows divided by scale_emb). Torch composite: the same slices'
pixels through our torch reference (tower + resampler, its own torch positions) and the LLM in torch
(our MiniCPM reference for 2.0, transformers' Qwen2 for 2.6) on embeddings with the rows in place of
the unk runs. Tolerance: max abs difference of the last-token logits under 2% of their standard
deviation (relative, as the tiny 2.0's logits are small: logits / (hidden / dim_model_base)), top-1
equal. Measured (2 threads): 2.0 8e-6 and 1.7e-5 on a std of 0.037 (46 and 206 prompt positions);
2.6 7.8e-3 and 1.3e-2 on a std of 1.5-1.6 (54 and 181 positions; llama.cpp's f16 KV cache). The ONNX
rows alone are within 1e-4 of torch (tests/export/test_minicpmv_vision.py).
Slices are made at scale_resolution 112 (8 x 8 patches) to keep the tiny runs fast; the rule is the same.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vishwamai_edge.export.gguf import convert_hf_to_gguf
from vishwamai_edge.export.minicpm_lm import load_minicpm_lm
from vishwamai_edge.export.minicpmv import read_minicpmv, write_llm_folder
from vishwamai_edge.export.minicpmv_vision import load_vision, position_table
from vishwamai_edge.export.onnx.minicpmv import export_minicpmv_vision
from vishwamai_edge.export.torch_state import safetensors_state
from vishwamai_edge.runtime.backends.llamacpp import LlamaCppBackend
from vishwamai_edge.runtime.minicpmv import MiniCPMVEncoder, prompt_segments
from vishwamai_edge.runtime.minicpmv_slices import placeholder, slice_pixels

QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def built(tiny_minicpmv, tmp_path_factory):
    """variant -> (layout, torch vision, torch LLM, tokenizer, GGUF path, ONNX encoder, scale_emb)."""
    import transformers

    out: dict[str, tuple] = {}

    def make(variant: str):
        if variant in out:
            return out[variant]
        root = tmp_path_factory.mktemp(f"minicpmv-{variant}")
        layout = read_minicpmv(tiny_minicpmv(variant))
        state = safetensors_state(layout.root, "MiniCPM-V")
        vision, vlayout = load_vision(state, layout.config, layout.root)
        llm_dir = root / "llm"
        llm_dir.mkdir()
        write_llm_folder(layout, llm_dir)
        if variant == "2.0":
            llm, scale = load_minicpm_lm(llm_dir), float(layout.config["scale_emb"])
        else:
            llm = transformers.AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
            scale = 1.0
        gguf = convert_hf_to_gguf(llm_dir, root / "llm.gguf", "f32").path
        graph = export_minicpmv_vision(vision, vlayout, root / "vision.onnx")
        slices = dataclasses.replace(layout.slices, scale_resolution=112)
        encoder = MiniCPMVEncoder.load(graph, position_table(state, vlayout), slices, vlayout.embed_dim, threads=2)
        tokenizer = reference_tokenizer(llm_dir)
        out[variant] = (slices, vision, llm, tokenizer, gguf, encoder, scale)
        return out[variant]

    return make


def reference_tokenizer(llm_dir):
    """piece, first -> ids: SentencePiece itself for a tokenizer.model-only folder (2.0, as published; as
    export/verify.py compares), else the HF tokenizer."""
    import transformers

    from vishwamai_edge.export.verify import SentencePieceReference, is_sentencepiece_only

    if is_sentencepiece_only(llm_dir):
        return SentencePieceReference(llm_dir).encode
    hf = transformers.AutoTokenizer.from_pretrained(llm_dir)
    return lambda piece, first: list(hf(piece, add_special_tokens=first)["input_ids"])


def torch_logits(variant, slices, vision, llm, tokenizer, image, text):
    """The composite in torch: unk runs replaced by the reference's rows, as the published code does."""
    run = slices.unk * slices.query_num
    pieces = text.split(run)
    plan_pixels = slice_pixels(image, _plan(image, slices))
    embed = llm.embed if variant == "2.0" else llm.get_input_embeddings()
    parts, ids_all = [], []
    with torch.no_grad():
        for i, piece in enumerate(pieces):
            ids = tokenizer(piece, i == 0)
            ids_all.append(ids)
            if ids:
                parts.append(embed(torch.tensor(ids)))
            if i < len(plan_pixels):
                x = torch.from_numpy(plan_pixels[i].copy()).float().div(255).sub(0.5).div(0.5).permute(2, 0, 1)[None]
                parts.append(vision(x)[0])
        logits = llm(inputs_embeds=torch.cat(parts)[None]).logits[0, -1].numpy()
    return logits, ids_all


def _plan(image, slices):
    from vishwamai_edge.runtime.minicpmv_slices import plan_slices

    return plan_slices(image.shape[1], image.shape[0], slices)


@pytest.mark.parametrize("variant", ["2.0", "2.6"])
@pytest.mark.parametrize("size, n_blocks", [((80, 100), 1), ((200, 300), 1 + 6)])
def test_device_logits_match_torch_composite(built, variant, size, n_blocks):
    slices, vision, llm, tokenizer, gguf, encoder, scale = built(variant)
    image = np.random.default_rng(3).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    plan, blocks = encoder.encode(image)
    assert len(blocks) == n_blocks == 1 + plan.n_slices
    text = placeholder(plan, slices) + "\n" + QUESTION
    want, want_ids = torch_logits(variant, slices, vision, llm, tokenizer, image, text)

    backend = LlamaCppBackend.load(gguf, n_ctx=1024, n_threads=2)
    try:
        def tokenize(piece: str, first: bool) -> list[int]:
            return backend.tokenize(piece, add_special=first, parse_special=True) if piece or first else []

        segments = prompt_segments(text, blocks, slices, tokenize, row_divisor=scale)
        token_segments = [list(s.tokens) for s in segments if hasattr(s, "tokens")]
        assert token_segments == [ids for ids in want_ids if ids]
        backend.prefill(segments)
        got = backend.logits()[:len(want)]
    finally:
        backend.close()
    diff = float(np.abs(got - want).max())
    assert diff < 0.02 * float(want.std()), (diff, float(want.std()))
    assert int(np.argmax(got)) == int(np.argmax(want))
