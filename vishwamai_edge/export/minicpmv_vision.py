"""Our torch reference of MiniCPM-V's vision side (tower + resampler), from a checkpoint's own tensors.

Read without OpenBMB's remote code. Two layouts, told apart by the tensors, never by a version
string alone:
- MiniCPM-V 2.0 (`vpm.blocks.N...`): a timm VisionTransformer `vit_so400m_patch14_siglip_384`
  (modeling_minicpmv.py `init_vision_module`: timm.create_model(..., num_classes=0,
  dynamic_img_size=True), attn_pool dropped, `blocks[:-1]` when drop_vision_last_layer, so the
  checkpoint stores 26 of 27 blocks); features are timm's `forward_features`: patch_embed conv,
  + pos_embed (1, 27*27, C) resampled to the slice's patch grid (timm `resample_abs_pos_embed`:
  bicubic, antialias, only when the grid differs), the blocks (pre-norm, fused qkv, exact erf GELU:
  timm 0.9.10, which OpenBMB's code pins, builds so400m with nn.GELU; LayerNorm eps 1e-6), then
  `vpm.norm`. The head count is the tower's, by the name in config.json's `vision_encoder`, as timm
  and llama.cpp's converter take it (so400m: 16), never worked out from the width.
- MiniCPM-V 2.6 (`vpm.embeddings...`, `vpm.encoder.layers.N...`): the NaViT-style
  SiglipVisionTransformer (modeling_navit_siglip.py): HF SigLIP's layers and names (GELU tanh, its
  `gelu_pytorch_tanh`), sizes from config.vision_config, but position ids bucketised from the slice's
  patch grid onto the (image_size / patch)^2 table: bucketize(arange(0, 1 - 1e-6, 1 / n),
  arange(1 / N, 1, 1 / N), right=True) per axis; then `post_layernorm`. (Its `reshape_by_patch` pixel layout is a plain
  patch conv in row-major patch order, so the reference takes the image itself.)
- The resampler (resampler.py of each revision): kv_proj (Linear without bias, or none when the
  widths agree), ln_kv, then torch's nn.MultiheadAttention with heads = embed_dim // 128:
  query = ln_q(query) (+ the stored `resampler.pos_embed` in 2.0; 2.6 keeps no such tensor and adds
  nothing), key = kv + a 2D sin-cos table of the slice's (h, w) patch grid, value = kv; then
  ln_post and `@ proj`. The table (get_2d_sincos_pos_embed): per patch (row i, col j), the first
  half of the channels encodes j, the second half i, each as [sin(p * w_k), cos(p * w_k)],
  w_k = 10000^(-k / (D/4)), k < D/4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SourceError, require
from ..runtime.minicpmv import PositionTable, sincos_2d
from ..runtime.minicpmv_slices import navit_position_ids
from .torch_state import load_exact

# kv_proj is absent when the tower and the LLM are equally wide
RESAMPLER_TENSORS = ("query", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                     "attn.out_proj.bias", "ln_q.weight", "ln_kv.weight", "ln_post.weight", "proj")
# MiniCPM-V 2.0's `vision_encoder` (a timm model name, tag after the dot) -> its attention heads
TIMM_TOWER_HEADS = {"vit_so400m_patch14_siglip_384": 16}


@dataclass(frozen=True)
class VisionLayout:
    variant: str  # "2.0" (timm tower, query pos_embed) or "2.6" (NaViT tower, none)
    width: int  # the tower's width
    n_layers: int  # stored blocks (all are run)
    n_heads: int
    gelu: str  # "none" (exact erf: timm's nn.GELU, 2.0) or "tanh" (HF SigLIP's gelu_pytorch_tanh, 2.6)
    patch: int
    pos_side: int  # the position table is pos_side x pos_side
    embed_dim: int  # the resampler's (= the LLM's) width
    n_queries: int
    kv_proj: bool


def read_vision_layout(state: dict[str, Any], config: dict[str, Any], where: Path) -> VisionLayout:
    """Which tower and resampler the tensors hold, and their sizes; one-line errors for what is missing."""
    missing = [f"resampler.{n}" for n in RESAMPLER_TENSORS if f"resampler.{n}" not in state]
    if missing:
        raise SourceError(f"{where}: the checkpoint has no resampler tensors {', '.join(missing[:4])}")
    embed_dim = int(state["resampler.query"].shape[1])
    n_queries = int(state["resampler.query"].shape[0])
    if "vpm.patch_embed.proj.weight" in state:
        variant, prefix = "2.0", "vpm.blocks."
        width, _, patch, _ = state["vpm.patch_embed.proj.weight"].shape
        pos_side = math.isqrt(int(state["vpm.pos_embed"].shape[1]))
        if "resampler.pos_embed" not in state:
            raise SourceError(f"{where}: a timm-style (MiniCPM-V 2.0) tower needs resampler.pos_embed")
        n_heads, gelu = timm_tower_heads(config, int(width), where), "none"
    elif "vpm.embeddings.patch_embedding.weight" in state:
        variant, prefix = "2.6", "vpm.encoder.layers."
        width, _, patch, _ = state["vpm.embeddings.patch_embedding.weight"].shape
        pos_side = math.isqrt(int(state["vpm.embeddings.position_embedding.weight"].shape[0]))
        vision = config.get("vision_config") or {}
        if "num_attention_heads" not in vision:
            raise SourceError(f"{where}/config.json: a NaViT SigLIP tower needs vision_config.num_attention_heads")
        n_heads, gelu = int(vision["num_attention_heads"]), "tanh"
    else:
        raise SourceError(f"{where}: no vision tower tensors (vpm.patch_embed.* or vpm.embeddings.*)")
    n_layers = len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
    if embed_dim // 128 < 1:
        raise SourceError(f"{where}: resampler width {embed_dim} is under 128 (heads = width // 128)")
    return VisionLayout(variant, int(width), n_layers, n_heads, gelu, int(patch), pos_side, embed_dim,
                        n_queries, "resampler.kv_proj.weight" in state)


def timm_tower_heads(config: dict[str, Any], width: int, where: Path) -> int:
    """MiniCPM-V 2.0's head count, from the timm model its config.json names."""
    name = str(config.get("vision_encoder") or "")
    heads = TIMM_TOWER_HEADS.get(name.split(".")[0])
    if heads is None:
        raise SourceError(f"{where}/config.json: vision_encoder {name!r} is not a tower this exporter knows "
                          f"(known: {', '.join(TIMM_TOWER_HEADS)})")
    if width % heads:
        raise SourceError(f"{where}: the tower is {width} wide, which {heads} heads "
                          f"(vision_encoder {name!r}) do not divide")
    return heads


def make_vision(layout: VisionLayout, mlp: int) -> Any:
    """Tower + resampler: forward(pixels (1, 3, H, W), H and W multiples of the patch) -> (1, queries, D)."""
    torch = require("torch", "build")
    nn, F = torch.nn, torch.nn.functional
    C, heads = layout.width, layout.n_heads

    class Mlp(nn.Module):  # fc1, GELU (the tower's own: erf in 2.0, tanh in 2.6), fc2
        def __init__(self, mlp: int):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(C, mlp), nn.Linear(mlp, C)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x), approximate=layout.gelu))

    def attend(q, k, v, out_proj, b: int, t: int):
        return out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, C))

    class TimmBlock(nn.Module):
        def __init__(self, mlp: int):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(C, eps=1e-6), nn.LayerNorm(C, eps=1e-6)
            self.attn = nn.Module()
            self.attn.qkv, self.attn.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.mlp = Mlp(mlp)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.attn.qkv(self.norm1(x)).reshape(b, t, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
            x = x + attend(q, k, v, self.attn.proj, b, t)
            return x + self.mlp(self.norm2(x))

    class NavitLayer(nn.Module):
        def __init__(self, mlp: int):
            super().__init__()
            self.layer_norm1, self.layer_norm2 = nn.LayerNorm(C, eps=1e-6), nn.LayerNorm(C, eps=1e-6)
            self.self_attn = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                setattr(self.self_attn, name, nn.Linear(C, C))
            self.mlp = Mlp(mlp)

        def forward(self, x):
            b, t, _ = x.shape
            h = self.layer_norm1(x)
            q, k, v = (getattr(self.self_attn, n)(h).reshape(b, t, heads, C // heads).transpose(1, 2)
                       for n in ("q_proj", "k_proj", "v_proj"))
            x = x + attend(q, k, v, self.self_attn.out_proj, b, t)
            return x + self.mlp(self.layer_norm2(x))

    class TimmTower(nn.Module):
        def __init__(self, mlp: int):
            super().__init__()
            self.patch_embed = nn.Module()
            self.patch_embed.proj = nn.Conv2d(3, C, layout.patch, layout.patch)
            self.pos_embed = nn.Parameter(torch.zeros(1, layout.pos_side ** 2, C))
            self.blocks = nn.ModuleList(TimmBlock(mlp) for _ in range(layout.n_layers))
            self.norm = nn.LayerNorm(C, eps=1e-6)

        def positions(self, gh: int, gw: int):
            """pos_embed on a gh x gw grid: timm's resample_abs_pos_embed (bicubic, antialias) when it differs."""
            pos = self.pos_embed
            if (gh, gw) != (layout.pos_side, layout.pos_side):
                grid = pos.reshape(1, layout.pos_side, layout.pos_side, C).permute(0, 3, 1, 2)
                grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False)
                pos = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, C)
            return pos[0]

        def forward(self, pixels, pos):
            x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2) + pos
            for block in self.blocks:
                x = block(x)
            return self.norm(x)

    class NavitTower(nn.Module):
        def __init__(self, mlp: int):
            super().__init__()
            self.embeddings = nn.Module()
            self.embeddings.patch_embedding = nn.Conv2d(3, C, layout.patch, layout.patch)
            self.embeddings.position_embedding = nn.Embedding(layout.pos_side ** 2, C)
            self.encoder = nn.Module()
            self.encoder.layers = nn.ModuleList(NavitLayer(mlp) for _ in range(layout.n_layers))
            self.post_layernorm = nn.LayerNorm(C, eps=1e-6)

        def positions(self, gh: int, gw: int):
            ids = torch.from_numpy(navit_position_ids(gh, gw, layout.pos_side))
            return self.embeddings.position_embedding(ids)

        def forward(self, pixels, pos):
            x = self.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2) + pos
            for layer in self.encoder.layers:
                x = layer(x)
            return self.post_layernorm(x)

    D = layout.embed_dim

    class Resampler(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Parameter(torch.zeros(layout.n_queries, D))
            if layout.variant == "2.0":
                self.pos_embed = nn.Parameter(torch.zeros(layout.n_queries, D))
            self.kv_proj = nn.Linear(C, D, bias=False) if layout.kv_proj else nn.Identity()
            self.attn = nn.MultiheadAttention(D, D // 128)
            self.ln_q, self.ln_kv, self.ln_post = (nn.LayerNorm(D, eps=1e-6) for _ in range(3))
            self.proj = nn.Parameter(torch.zeros(D, D))

        def forward(self, x, key_pos):
            kv = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # (T, 1, D)
            q = self.ln_q(self.query)[:, None]
            if layout.variant == "2.0":
                q = q + self.pos_embed[:, None]
            out = self.attn(q, kv + key_pos[:, None], kv, need_weights=False)[0].permute(1, 0, 2)
            return self.ln_post(out) @ self.proj

    class MiniCPMVVision(nn.Module):
        def __init__(self):
            super().__init__()
            self.vpm = TimmTower(mlp) if layout.variant == "2.0" else NavitTower(mlp)
            self.resampler = Resampler()

        def positions(self, gh: int, gw: int):
            """The grid-dependent inputs of `encode`: the tower's (gh*gw, C) and the keys' (gh*gw, D) positions."""
            return self.vpm.positions(gh, gw).detach(), torch.from_numpy(sincos_2d(D, gh, gw))

        def encode(self, pixel_values, tower_pos, key_pos):
            """What the ONNX graph holds: every shape-dependent table comes in as an input."""
            return self.resampler(self.vpm(pixel_values, tower_pos), key_pos)

        def forward(self, pixel_values):
            h, w = pixel_values.shape[2] // layout.patch, pixel_values.shape[3] // layout.patch
            return self.encode(pixel_values, *self.positions(h, w))

    return MiniCPMVVision()


def load_vision(state: dict[str, Any], config: dict[str, Any], where: Path) -> tuple[Any, VisionLayout]:
    """The checkpoint's vision side in fp32, eval mode; every vpm.* / resampler.* tensor must fit."""
    layout = read_vision_layout(state, config, where)
    fc1 = "vpm.blocks.0.mlp.fc1.weight" if layout.variant == "2.0" else "vpm.encoder.layers.0.mlp.fc1.weight"
    if fc1 not in state:
        raise SourceError(f"{where}: the vision tower has no {fc1}")
    module = make_vision(layout, int(state[fc1].shape[0]))
    vision = {k: v.float() for k, v in state.items() if k.startswith(("vpm.", "resampler."))}
    load_exact(module, vision, where, "MiniCPM-V vision side")
    return module.eval(), layout


def position_table(state: dict[str, Any], layout: VisionLayout) -> PositionTable:
    """The tower's stored position table, which the runtime puts on each slice's grid."""
    name = "vpm.pos_embed" if layout.variant == "2.0" else "vpm.embeddings.position_embedding.weight"
    table = state[name].float().numpy().reshape(layout.pos_side ** 2, layout.width)
    return PositionTable(layout.variant, table, layout.pos_side)
