"""Tiny random MiniCPM checkpoints with the published config keys and tensor names (no hub access).

The config keys are MiniCPM-2B's / MiniCPM-V 2.0's (openbmb config.json: scale_emb, scale_depth,
dim_model_base, tie_word_embeddings). The scales are set away from MiniCPM-2B's own values (12, 1.4,
256), which llama.cpp falls back to when a GGUF lacks the keys: a key not written or not read fails.
The tokenizer is SentencePiece's tokenizer.model without a tokenizer.json, as openbmb/MiniCPM-V-2 ships
it (a LlamaTokenizer subclass, slow); the checks then compare with SentencePiece itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TINY_MINICPM = dict(
    architectures=["MiniCPMForCausalLM"], model_type="minicpm", hidden_size=64, intermediate_size=128,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    rms_norm_eps=1e-5, rope_theta=10000.0, scale_emb=3.0, scale_depth=2.2, dim_model_base=16,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
)


def random_minicpm_state(config: dict, seed: int = 0, prefix: str = "") -> dict:
    """Random weights for `config` under the checkpoint's names; norms away from 1 so a wrong one shows."""
    import torch

    from vishwamai_edge.export.minicpm_lm import make_minicpm_lm

    torch.manual_seed(seed)
    module = make_minicpm_lm(config, tied=bool(config.get("tie_word_embeddings")))
    state = {}
    for name, value in module.state_dict().items():
        if name.endswith("norm.weight"):
            value = 1.0 + 0.2 * torch.randn_like(value)
        state[prefix + name] = value.contiguous()
    return state


def build_tiny_minicpm(out: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """An HF folder of a random tiny MiniCPM LLM with the given (SentencePiece) tokenizer."""
    from safetensors.torch import save_file
    from tiny_models import vocab_size_of

    out.mkdir(parents=True, exist_ok=True)
    config = {**TINY_MINICPM, "vocab_size": vocab_size_of(tokenizer_dir), **overrides}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_minicpm_state(config, seed), str(out / "model.safetensors"))
    for f in tokenizer_dir.iterdir():
        if f.name != "tokenizer.json":  # as published: tokenizer.model and its config, no tokenizer.json
            shutil.copy2(f, out / f.name)
    return out
