"""llama.cpp quantization of our GGUFs: the types really written, imatrix use, and accuracy."""

from __future__ import annotations

from collections import Counter

import gguf
import pytest

from vishwamai_edge.errors import ExportError
from vishwamai_edge.export.gguf import convert_hf_to_gguf
from vishwamai_edge.export.imatrix import imatrix_for
from vishwamai_edge.export.quantize import quantize_gguf
from vishwamai_edge.export.verify import TorchReference, check_gguf

# Tiny random models have near-tied logits, so top-1 is not asserted here (the end-to-end
# tests check it on the real model); max and mean differences are.
PROMPTS = ["The capital of France is", "def add(a, b):", "Numbers 1 2 3 4 5 and more"]


@pytest.fixture(scope="module")
def f16(tiny_model, tmp_path_factory):
    hf_dir = tiny_model("qwen2")
    return hf_dir, convert_hf_to_gguf(hf_dir, tmp_path_factory.mktemp("q") / "m-f16.gguf", "f16").path


def test_q8_0_close_to_torch(f16, tmp_path):
    hf_dir, src = f16
    types = quantize_gguf(src, tmp_path / "m-q8_0.gguf", "q8_0", n_threads=2)
    assert types.get("Q8_0", 0) > 0 and set(types) <= {"Q8_0", "F32"}
    check = check_gguf(TorchReference(hf_dir), tmp_path / "m-q8_0.gguf", PROMPTS, n_threads=2)
    assert check.max_abs_diff < 0.1 and check.mean_abs_diff < 0.03, check


# llama.cpp's fallback for a row that is no multiple of 256: the mix's main K type (Q4_K,
# Q5_K) becomes Q5_0 / Q5_1, and the Q6_K it gives token_embd and some attn_v / ffn_down Q8_0.
FALLBACK = {"q4_k_m": "Q5_0", "q5_k_m": "Q5_1"}


@pytest.mark.parametrize("quant", ["q4_k_m", "q5_k_m"])
def test_k_quants_record_fallback_types(f16, tmp_path, quant):
    """Rows of 64 values do not fill a 256-value K block: llama.cpp falls back, and we record it."""
    hf_dir, src = f16
    reference = TorchReference(hf_dir)
    imatrix = imatrix_for(hf_dir, reference.model, reference.tokenizer)
    assert imatrix and all(v.ndim == 1 and (v >= 0).all() for v in imatrix.values())
    out = tmp_path / f"m-{quant}.gguf"
    types = quantize_gguf(src, out, quant, n_threads=2, imatrix=imatrix)
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types == dict(Counter(written.values()))  # the record is what the file holds
    assert set(types) == {FALLBACK[quant], "Q8_0", "F32"}, types  # no K type: every K block fell back
    assert written["token_embd.weight"] == "Q8_0"  # Q6_K's fallback
    check = check_gguf(reference, out, PROMPTS, n_threads=2)
    assert check.max_abs_diff < 0.5, check


def test_unknown_quant(f16, tmp_path):
    with pytest.raises(ExportError, match="unknown quantization"):
        quantize_gguf(f16[1], tmp_path / "x.gguf", "q2_xs")
