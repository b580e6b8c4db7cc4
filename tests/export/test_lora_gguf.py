"""PEFT LoRA adapters -> LoRA GGUF, applied by llama.cpp at run time, against the merged torch model,
on tiny random models (llama with its q/k RoPE permutation, qwen2 with biases, gemma); and what the
writer and the runtime refuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

PROMPTS = ["The capital of France is", "def fibonacci(n):", "In 1969, 3 astronauts flew to the Moon."]
# llama.cpp F32 base + F32 adapter against torch's merged fp32 model, last-token logits: llama.cpp's
# f16 KV cache is the difference (as for the F32 GGUF check alone); measured below 2e-3.
TOLERANCE = 5e-3


def random_adapter(hf_dir: Path, out: Path, r: int = 4, alpha: int = 8, seed: int = 0, **extra) -> Path:
    """A PEFT LoRA on every linear of the blocks, with random A and B (B is zero at PEFT's init)."""
    import peft
    import torch
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0, **extra)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    return out


def merged_logits(hf_dir: Path, adapter: Path, prompts: list[str]) -> list[np.ndarray]:
    import peft
    import torch
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    tok = T.AutoTokenizer.from_pretrained(hf_dir)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]])
            out.append(model(input_ids=ids).logits[0, -1].numpy())
    return out, tok


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_adapter_in_llama_cpp_equals_merged_torch(tiny_model, tmp_path, family):
    from vishwamai_edge.export.gguf import convert_hf_to_gguf
    from vishwamai_edge.export.gguf.lora import write_lora_gguf
    from vishwamai_edge.runtime.backends import TokenSegment
    from vishwamai_edge.runtime.backends.llamacpp import LlamaCppBackend

    hf = tiny_model(family)
    adapter = random_adapter(hf, tmp_path / "adapter")
    base = convert_hf_to_gguf(hf, tmp_path / "base-f32.gguf", "f32").path
    info = write_lora_gguf(adapter, hf, tmp_path / "lora.gguf", "f32", base_digest="d" * 64)
    assert info.rank == 4 and info.alpha == 8.0 and info.tensors == 7 * 2  # 7 linears a layer, 2 layers
    want, tok = merged_logits(hf, adapter, PROMPTS)
    backend = LlamaCppBackend.load(base, n_ctx=128, n_threads=2)
    try:
        backend.load_adapter("a", info.path)
        diffs, base_diffs = [], []
        for prompt, w in zip(PROMPTS, want):
            ids = tok(prompt)["input_ids"]
            backend.use_adapter("a")
            backend.prefill([TokenSegment(ids)])
            got = backend.logits()[: len(w)]
            diffs.append(float(np.abs(got - w).max()))
            backend.use_adapter(None)  # the base alone: the adapter really changes the logits
            backend.prefill([TokenSegment(ids)])
            base_diffs.append(float(np.abs(backend.logits()[: len(w)] - w).max()))
    finally:
        backend.close()
    print(family, "adapter vs merged:", max(diffs), "base alone vs merged:", min(base_diffs))
    assert max(diffs) < TOLERANCE
    assert min(base_diffs) > 20 * TOLERANCE


def test_rslora_alpha_is_written_for_llama_cpps_scale(tiny_model, tmp_path):
    from vishwamai_edge.export.gguf.lora import write_lora_gguf

    hf = tiny_model("llama")
    adapter = random_adapter(hf, tmp_path / "adapter", r=4, alpha=8, use_rslora=True)
    info = write_lora_gguf(adapter, hf, tmp_path / "lora.gguf")
    assert info.alpha == pytest.approx(8 * 2)  # alpha / sqrt(r) == (alpha * sqrt(r)) / r


def test_adapter_for_another_base_is_refused(tiny_model, tmp_path):
    from vishwamai_edge.errors import ExportError
    from vishwamai_edge.export.gguf.lora import write_lora_gguf

    adapter = random_adapter(tiny_model("llama"), tmp_path / "adapter")
    with pytest.raises(ExportError, match="trained on another model"):
        write_lora_gguf(adapter, tiny_model("gemma"), tmp_path / "lora.gguf")
    assert not (tmp_path / "lora.gguf").exists()


def test_dora_and_modules_to_save_are_refused(tiny_model, tmp_path):
    from vishwamai_edge.errors import ExportError
    from vishwamai_edge.export.gguf.lora import write_lora_gguf

    hf = tiny_model("llama")
    adapter = random_adapter(hf, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    for key, value in (("use_dora", True), ("modules_to_save", ["lm_head"])):
        broken = tmp_path / key
        shutil.copytree(adapter, broken)
        (broken / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ExportError, match=key):
            write_lora_gguf(broken, hf, tmp_path / "lora.gguf")


def test_a_file_that_is_no_adapter_is_a_one_line_error(tiny_model, tmp_path):
    from vishwamai_edge.errors import BundleError
    from vishwamai_edge.export.gguf import convert_hf_to_gguf
    from vishwamai_edge.runtime.backends.llamacpp import LlamaCppBackend

    hf = tiny_model("llama")
    base = convert_hf_to_gguf(hf, tmp_path / "base.gguf", "f16").path
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(200))
    backend = LlamaCppBackend.load(base, n_ctx=64, n_threads=1)
    try:
        with pytest.raises(BundleError, match="cannot load the adapter") as exc:
            backend.load_adapter("junk", junk)
        assert "\n" not in str(exc.value)
        assert backend.tokenize("still works")  # the model is unharmed
    finally:
        backend.close()
