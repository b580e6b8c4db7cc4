"""MiniCPM (MiniCPM-2B, the LLM of MiniCPM-V 2.0; llama.cpp arch `minicpm`).

A Llama with three scales (openbmb's modeling_minicpm.py): token embeddings x `scale_emb`, each
residual branch x `scale_depth / sqrt(num_hidden_layers)`, and the final hidden state divided by
`hidden_size / dim_model_base` before lm_head. llama.cpp reads them as `minicpm.embedding_scale`,
`minicpm.residual_scale` and `minicpm.logit_scale` (the logits are divided by the last), the keys its
own converter writes (convert_hf_to_gguf.py / conversion/minicpm.py `MiniCPMModel`, which also
permutes q/k for RoPE as for Llama). Without them llama.cpp falls back to MiniCPM-2B's values
(12, 1.4 / sqrt(L), 256 / hidden), so the keys are written always.
"""

from __future__ import annotations

import math

import gguf

from .base import register
from .llama import LlamaConverter


@register("MiniCPMForCausalLM")
class MiniCPMConverter(LlamaConverter):
    arch = gguf.MODEL_ARCH.MINICPM

    def set_parameters(self, w: gguf.GGUFWriter) -> None:
        super().set_parameters(w)
        scales = minicpm_scales(self.hparams)
        w.add_embedding_scale(scales["embedding"])
        w.add_residual_scale(scales["residual"])
        w.add_logit_scale(scales["logit"])


def minicpm_scales(hparams: dict) -> dict[str, float]:
    """The three MiniCPM multipliers from an HF config: embedding, residual (per branch), logit (divisor)."""
    return {
        "embedding": float(hparams["scale_emb"]),
        "residual": float(hparams["scale_depth"]) / math.sqrt(int(hparams["num_hidden_layers"])),
        "logit": float(hparams["hidden_size"]) / float(hparams["dim_model_base"]),
    }
