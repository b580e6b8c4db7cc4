"""Helpers for profile tests: a tiny GGUF header and a fake bundle around it."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def write_tiny_gguf(path: Path, arch: str = "llama", **overrides) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(overrides.get("n_layer", 4))
    w.add_embedding_length(overrides.get("n_embd", 64))
    w.add_head_count(overrides.get("n_head", 8))
    w.add_head_count_kv(overrides.get("n_head_kv", 2))
    w.add_context_length(overrides.get("n_ctx", 256))
    w.add_token_list([f"tok{i}" for i in range(300)])  # a string array the reader must skip
    w.add_token_scores([0.0] * 300)  # and a numeric one
    w.add_tensor("token_embd.weight", np.zeros((300, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_fake_bundle(tmp_path: Path) -> Path:
    """A bundle folder whose manifest and GGUF header are real; no model is ever loaded from it."""
    from vishwamai_edge.runtime.bundle import write_manifest

    root = tmp_path / "tiny-bundle"
    (root / "llm").mkdir(parents=True)
    write_tiny_gguf(root / "llm" / "model.gguf")
    write_manifest(
        root,
        {"name": "tiny-laptop-cpu-q4_k_m",
         "target": {"name": "laptop-cpu", "memory_gb": 16, "memory_bandwidth_gbs": 50, "cuda_arch": None},
         "llm": {"backend": "llamacpp", "format": "gguf", "quant": "q4_k_m", "file": "llm/model.gguf"}},
        ["llm/model.gguf"],
    )
    return root
