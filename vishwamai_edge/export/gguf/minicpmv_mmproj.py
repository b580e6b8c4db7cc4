"""MiniCPM-V 2.6 vision side (NaViT SigLIP + resampler) -> llama.cpp mmproj GGUF, for stock libmtmd.

Keys and tensor names as llama.cpp's MiniCPM-V converter writes them
(tools/mtmd/legacy-models/minicpmv-convert-image-encoder-to-gguf.py, `--minicpmv_version 3` for 2.6)
and clip.cpp reads them: `clip.projector_type` "resampler", `clip.has_minicpmv_projector`,
`clip.minicpmv_version` 3, `clip.minicpmv_query_num`, the usual `clip.vision.*` sizes with
mean = std = 0.5; tower tensors `v.patch_embd`, `v.position_embd` (the 70 x 70 NaViT table),
`v.blk.N.{attn_q,attn_k,attn_v,attn_out,ln1,ln2,ffn_up,ffn_down}`, `v.post_ln`; resampler tensors
`resampler.query`, `resampler.kv.weight` (kv_proj), `resampler.attn.{q,k,v}.{weight,bias}` (the
chunks of in_proj), `resampler.attn.out`, `resampler.ln_{q,kv,post}`, `resampler.proj.weight`
(the checkpoint's `proj` transposed) and `resampler.pos_embed_k` (the keys' 2D sin-cos table on
70 x 70). fc1/fc2 are written as ffn_up/ffn_down (their meaning), as export/gguf/mmproj.py does.
2.0 has no mmproj: llama.cpp's mtmd does not carry it (its version 1 is not in clip.cpp's graph).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ExportError

NAVIT_SIDE = 70  # clip.cpp buckets MiniCPM-V 2.5+ positions onto a 70 x 70 table (980 / 14)


def write_minicpmv_mmproj(layout: Any, out: Path, outtype: str = "f16") -> Path:
    """`layout` is export/minicpmv.py's MiniCPMVLayout of a 2.6 folder; the caller makes `out` atomic."""
    import gguf

    from ...runtime.minicpmv import sincos_2d
    from ..minicpmv_vision import read_vision_layout
    from ..torch_state import safetensors_state

    if layout.version != "2.6":
        raise ExportError(f"no mmproj for MiniCPM-V {layout.version}: llama.cpp's mtmd carries 2.5 and later")
    state = safetensors_state(layout.root, "MiniCPM-V")
    v = read_vision_layout(state, layout.config, layout.root)
    if v.pos_side != NAVIT_SIDE:
        raise ExportError(f"{layout.root}: the tower's position table is {v.pos_side} x {v.pos_side}; llama.cpp's "
                          f"MiniCPM-V graph buckets positions onto {NAVIT_SIDE} x {NAVIT_SIDE}")
    cfg = layout.config.get("vision_config") or {}
    half = outtype == "f16"

    def arr(t: Any, matrix: bool = False) -> np.ndarray:
        a = t.float().numpy()
        return a.astype(np.float16) if half and matrix else a.astype(np.float32)

    w = gguf.GGUFWriter(str(out), arch="clip")
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_minicpmv_projector", True)
    w.add_file_type(1 if half else 0)
    w.add_description("image encoder for MiniCPM-V 2.6")
    w.add_string("clip.projector_type", "resampler")
    w.add_int32("clip.minicpmv_version", 3)
    w.add_uint32("clip.vision.image_size", int(layout.config.get("image_size", 448)))
    w.add_uint32("clip.vision.patch_size", v.patch)
    w.add_uint32("clip.vision.embedding_length", v.width)
    w.add_uint32("clip.vision.feed_forward_length", int(state["vpm.encoder.layers.0.mlp.fc1.weight"].shape[0]))
    w.add_uint32("clip.vision.projection_dim", 0)
    w.add_uint32("clip.vision.attention.head_count", v.n_heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", float(cfg.get("layer_norm_eps", 1e-6)))
    w.add_uint32("clip.vision.block_count", v.n_layers)
    w.add_uint32("clip.minicpmv_query_num", v.n_queries)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    w.add_bool("clip.use_gelu", True)

    # the patch conv is always f16 in llama.cpp's converter (ggml's conv kernels)
    w.add_tensor("v.patch_embd.weight", state["vpm.embeddings.patch_embedding.weight"].float().numpy().astype(np.float16))
    w.add_tensor("v.patch_embd.bias", arr(state["vpm.embeddings.patch_embedding.bias"]))
    w.add_tensor("v.position_embd.weight", arr(state["vpm.embeddings.position_embedding.weight"]))
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
             "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
    for i in range(v.n_layers):
        for src, dst in names.items():
            for kind in ("weight", "bias"):
                t = state[f"vpm.encoder.layers.{i}.{src}.{kind}"]
                w.add_tensor(f"v.blk.{i}.{dst}.{kind}", arr(t, matrix=t.ndim == 2))
    w.add_tensor("v.post_ln.weight", arr(state["vpm.post_layernorm.weight"]))
    w.add_tensor("v.post_ln.bias", arr(state["vpm.post_layernorm.bias"]))

    r = {k[len("resampler."):]: t for k, t in state.items() if k.startswith("resampler.")}
    w.add_tensor("resampler.query", arr(r["query"]))
    if "kv_proj.weight" in r:
        w.add_tensor("resampler.kv.weight", arr(r["kv_proj.weight"], matrix=True))
    for kind in ("weight", "bias"):
        for name, part in zip("qkv", r[f"attn.in_proj_{kind}"].chunk(3, dim=0)):
            w.add_tensor(f"resampler.attn.{name}.{kind}", arr(part, matrix=kind == "weight"))
        w.add_tensor(f"resampler.attn.out.{kind}", arr(r[f"attn.out_proj.{kind}"], matrix=kind == "weight"))
        for ln in ("q", "kv", "post"):
            w.add_tensor(f"resampler.ln_{ln}.{kind}", arr(r[f"ln_{ln}.{kind}"]))
    w.add_tensor("resampler.proj.weight", arr(r["proj"].t().contiguous(), matrix=True))
    w.add_tensor("resampler.pos_embed_k", sincos_2d(v.embed_dim, NAVIT_SIDE, NAVIT_SIDE))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)
