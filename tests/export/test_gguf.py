"""HF -> GGUF parity: tiny random Llama (Llama 3 rope scaling; and with q/k/v/o biases),
Mistral (SentencePiece), Qwen2 (biases, tied embeddings), Gemma (norm offset, own
head_dim, its own tokenizer) and MiniCPM (embedding, residual and logit scales; against our
own torch reference, transformers has no class) models; llama.cpp's logits against torch fp32.

Tolerances (max abs difference of last-token logits, stated per output type):
  f32  1e-2  (llama.cpp keeps its KV cache in f16: measured about 3e-3)
  f16  2e-2  (weights rounded to fp16 as well: measured about 6e-3)
  bf16 1e-1  (8-bit mantissa)
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from vishwamai_edge.errors import ExportError
from vishwamai_edge.export.gguf import convert_hf_to_gguf
from vishwamai_edge.export.verify import TorchReference, check_gguf
from vishwamai_edge.recipe import DEFAULT_VERIFY_PROMPTS

TOLERANCE = {"f32": 1e-2, "f16": 2e-2, "bf16": 1e-1}
PROMPTS = DEFAULT_VERIFY_PROMPTS + ["Привет, как дела?", "x = [1, 2, 3]\nprint(sum(x))"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma-chat", "llama-bias"])
@pytest.mark.parametrize("outtype", ["f16", "f32"])
def test_logits_match_torch(tiny_model, tiny_variant, tmp_path, family, outtype):
    # dashed names are tiny_variant's; llama-bias has random q/k biases, permuted for RoPE as their weights
    hf_dir = tiny_variant(family) if "-" in family else tiny_model(family)
    out = convert_hf_to_gguf(hf_dir, tmp_path / f"{family}-{outtype}.gguf", outtype)
    check = check_gguf(TorchReference(hf_dir), out.path, PROMPTS, n_threads=2)
    assert check.max_abs_diff < TOLERANCE[outtype], check
    assert check.top1_agreement == 1.0, check
    assert check.tokenizer_agreement == 1.0, check


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("outtype", ["f16", "f32"])
def test_minicpm_logits_match_reference(tiny_minicpm, tmp_path, tied, outtype):
    hf_dir = tiny_minicpm(tied)
    out = convert_hf_to_gguf(hf_dir, tmp_path / f"minicpm-{outtype}.gguf", outtype)
    assert out.arch == "minicpm"
    check = check_gguf(TorchReference(hf_dir), out.path, PROMPTS, n_threads=2)
    assert check.max_abs_diff < TOLERANCE[outtype], check
    assert check.top1_agreement == 1.0, check
    assert check.tokenizer_agreement == 1.0, check


def test_minicpm_scales_written(tiny_minicpm, tmp_path):
    hf_dir = tiny_minicpm(False)
    reader = gguf.GGUFReader(convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf", "f16").path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("minicpm.")}
    assert fields["minicpm.embedding_scale"] == pytest.approx(3.0)
    assert fields["minicpm.residual_scale"] == pytest.approx(2.2 / 3 ** 0.5)
    assert fields["minicpm.logit_scale"] == pytest.approx(64 / 16)
    assert "output.weight" in {t.name for t in reader.tensors}  # untied lm_head kept


def test_minicpm_without_scales_does_not_match(tiny_minicpm, tmp_path):
    """The parity test can fail: without the keys llama.cpp uses MiniCPM-2B's own scales."""
    from vishwamai_edge.export.gguf import minicpm
    from vishwamai_edge.export.gguf.base import converter_for, write_gguf
    from vishwamai_edge.export.gguf.vocab import add_vocab

    hf_dir = tiny_minicpm(False)
    converter = converter_for(hf_dir)
    converter.set_parameters = lambda w: super(minicpm.MiniCPMConverter, converter).set_parameters(w)
    path = tmp_path / "no-scales.gguf"
    write_gguf(converter, path, "f32", lambda w: add_vocab(w, hf_dir, converter.hparams["vocab_size"]), "x")
    check = check_gguf(TorchReference(hf_dir), path, PROMPTS[:3], n_threads=2)
    assert check.max_abs_diff > 3 * TOLERANCE["f32"], check  # measured 4.5e-2; with the keys 2e-4


def test_minicpm_spliced_rows_divided_by_embedding_scale(tiny_minicpm, tmp_path):
    """llama.cpp's minicpm graph multiplies every input row by embedding_scale, embeddings given as rows
    too; MiniCPM-V 2.0 splices its image rows into the scaled text embeddings unscaled. So rows
    spliced in go to llama.cpp divided by scale_emb: the contract the runtime relies on."""
    import torch

    from vishwamai_edge.export.minicpm_lm import load_minicpm_lm
    from vishwamai_edge.runtime.backends import EmbeddingSegment, TokenSegment
    from vishwamai_edge.runtime.backends.llamacpp import LlamaCppBackend

    hf_dir = tiny_minicpm(False)
    out = convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf", "f32")
    ref = load_minicpm_lm(hf_dir)
    ids = [1, 50, 60, 70]
    rows = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)  # stand-ins for image rows
    with torch.no_grad():
        embeds = torch.cat([ref.embed(torch.tensor(ids)), torch.from_numpy(rows)])[None]
        want = ref(inputs_embeds=embeds).logits[0, -1].numpy()
    got = {}
    for divisor in (3.0, 1.0):  # scale_emb of the tiny model, and no division
        backend = LlamaCppBackend.load(out.path, n_ctx=64, n_threads=2)
        try:
            backend.prefill([TokenSegment(ids), EmbeddingSegment(rows / divisor)])
            got[divisor] = float(np.abs(backend.logits()[:len(want)] - want).max())
        finally:
            backend.close()
    assert got[3.0] < TOLERANCE["f32"], got
    assert got[1.0] > 3 * TOLERANCE["f32"], got


def test_bf16_output(tiny_model, tmp_path):
    hf_dir = tiny_model("llama")
    out = convert_hf_to_gguf(hf_dir, tmp_path / "llama-bf16.gguf", "bf16")
    assert out.tensor_types.get("BF16", 0) > 0
    check = check_gguf(TorchReference(hf_dir), out.path, PROMPTS[:3], n_threads=2)
    assert check.max_abs_diff < TOLERANCE["bf16"], check


def test_metadata_written(tiny_model, tmp_path):
    hf_dir = tiny_model("qwen2")
    out = convert_hf_to_gguf(hf_dir, tmp_path / "q.gguf", "f16")
    reader = gguf.GGUFReader(out.path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert fields["general.architecture"] == "qwen2"
    assert fields["qwen2.block_count"] == 2
    assert fields["qwen2.attention.head_count_kv"] == 2
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied embeddings: llama.cpp reuses token_embd
    assert "blk.0.attn_q.bias" in names


def test_llama3_rope_factors_written(tiny_model, tmp_path):
    out = convert_hf_to_gguf(tiny_model("llama"), tmp_path / "l.gguf", "f16")
    reader = gguf.GGUFReader(out.path)
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    data = np.asarray(freqs.data)
    assert data.shape == (8,)  # head_dim 16 / 2
    assert data[0] == 1.0 and data[-1] == 8.0  # high frequencies kept, low ones scaled by `factor`


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["FancyNetForCausalLM"], "model_type": "fancy"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ExportError, match="FancyNetForCausalLM"):
        convert_hf_to_gguf(tmp_path, tmp_path / "x.gguf")
