"""Gemma (llama.cpp arch `gemma`): RMSNorm scales by (1 + weight), so the offset is baked in."""

from __future__ import annotations

import gguf
import numpy as np

from .base import ModelConverter, register


@register("GemmaForCausalLM")
class GemmaConverter(ModelConverter):
    arch = gguf.MODEL_ARCH.GEMMA

    def modify_tensor(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        if hf_name.endswith("norm.weight"):
            return data + 1.0
        return data
