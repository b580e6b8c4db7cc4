"""The KV cache of a profiled bundle: its type, its size as llama.cpp allocated it (checked
against the formula), and what the type costs in quality: the largest logit difference from an
f16 cache over every position of a fixed prompt set, with how often the top token agrees.

The reference is a second context of the same GGUF with an f16 cache, the same context size
and batch size, each prompt evaluated in one batch from an empty cache on both sides: the only
difference is the cache type (and the flash attention a quantized V needs).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..runtime.kv_cache import kv_cache_bytes, kv_type
from .gguf_meta import ModelShape
from .measure import FILLER

# Fixed prompts: prose, a question, code and numbers (quantization error shows differently on each)
QUALITY_PROMPTS = (
    FILLER,
    "Question: What is the capital of France, and which river runs through it?\nAnswer:",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(12)])\n",
    "Invoice 4471: 3 x 12.50 EUR, 7 x 0.99 EUR, shipping 4.95 EUR; total due 2026-12-31.",
)


def prompt_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """Logits of every position of `ids`, (len(ids), n_vocab), evaluated in one batch from empty."""
    llm.reset()
    rows = llm.decode([(0, ids, "all")])[0]
    out = llm.logits_at(rows)
    llm.reset()
    return out


def quality(llm: Any, reference: Any, prompts: tuple[str, ...] = QUALITY_PROMPTS) -> dict[str, Any]:
    """Max |logit - f16 logit| and top-1 agreement over all positions of `prompts`."""
    worst, agree, positions = 0.0, 0, 0
    for text in prompts:
        ids = llm.tokenize(text, add_special=False, parse_special=False)[: llm.n_batch]
        a, b = prompt_logits(llm, ids), prompt_logits(reference, ids)
        worst = max(worst, float(np.max(np.abs(a - b))))
        agree += int(np.sum(a.argmax(axis=1) == b.argmax(axis=1)))
        positions += len(ids)
    return {"max_abs_logit_diff": worst, "top1_agreement": agree / positions, "positions": positions,
            "prompts": len(prompts)}


def formula_bytes(shape: ModelShape, cells: int, kv_name: str) -> int:
    """n_layer x cells x (n_head_kv x head_dim_k + n_head_kv x head_dim_v) x bytes per element."""
    return kv_cache_bytes(shape.n_layer, cells, shape.n_head_kv * shape.head_dim_k,
                          shape.n_head_kv * shape.head_dim_v, kv_type(kv_name))


def kv_entry(llm: Any, shape: ModelShape, threads: int) -> dict[str, Any]:
    """The report's `kv_cache` section for a loaded llama.cpp backend."""
    from ..runtime.backends.llamacpp import LlamaCppBackend

    report = llm.kv_report or {}
    cells = report.get("cells", llm.n_ctx * llm.n_seq)
    entry: dict[str, Any] = {
        "type": llm.kv_type,
        "cells": cells,
        "bytes": (report["k_bytes"] + report["v_bytes"]) if report else None,
        "source": "llama.cpp's log (llama_kv_cache: size = ...)" if report else None,
        "formula_bytes": formula_bytes(shape, cells, llm.kv_type),
        "f16_bytes": formula_bytes(shape, cells, "f16"),
    }
    if llm.kv_type == "f16":
        entry["quality"] = {"max_abs_logit_diff": 0.0, "top1_agreement": 1.0, "reference": "itself (f16)"}
        return entry
    ref = LlamaCppBackend.load(llm.path, n_ctx=llm.n_ctx, n_threads=threads, n_batch=llm.n_batch, kv_type="f16")
    try:
        entry["quality"] = {**quality(llm, ref), "reference": "the same GGUF with an f16 KV cache"}
    finally:
        ref.close()
    return entry
