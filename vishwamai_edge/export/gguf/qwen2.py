"""Qwen2 and Qwen2.5 (llama.cpp arch `qwen2`: NEOX-style RoPE, so q/k stay as HF stores them)."""

from __future__ import annotations

import gguf

from .base import ModelConverter, register


@register("Qwen2ForCausalLM")
class Qwen2Converter(ModelConverter):
    arch = gguf.MODEL_ARCH.QWEN2
