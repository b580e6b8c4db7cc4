"""Llama family: Llama 2/3, SmolLM, Mistral, TinyLlama, Vicuna (llama.cpp arch `llama`)."""

from __future__ import annotations

import gguf
import numpy as np

from .base import ModelConverter, permute_for_rope, register


@register("LlamaForCausalLM", "MistralForCausalLM")
class LlamaConverter(ModelConverter):
    arch = gguf.MODEL_ARCH.LLAMA

    def modify_tensor(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        if hf_name.endswith("self_attn.q_proj.weight"):
            return permute_for_rope(data, self.n_head)
        if hf_name.endswith("self_attn.k_proj.weight"):
            return permute_for_rope(data, self.n_head_kv)
        return data
