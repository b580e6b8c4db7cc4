"""Llama family: Llama 2/3, SmolLM, Mistral, TinyLlama, Vicuna (llama.cpp arch `llama`)."""

from __future__ import annotations

import gguf
import numpy as np

from .base import ModelConverter, permute_for_rope, register


@register("LlamaForCausalLM", "MistralForCausalLM")
class LlamaConverter(ModelConverter):
    arch = gguf.MODEL_ARCH.LLAMA

    def modify_tensor(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        # A bias (attention_bias=True) is added to the projection's output rows, so its
        # entries move with the weight's rows.
        if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return permute_for_rope(data, self.n_head)
        if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return permute_for_rope(data, self.n_head_kv)
        return data
