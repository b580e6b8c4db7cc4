"""Our MiniCPM-V vision reference (timm SigLIP / NaViT SigLIP + resampler) from tiny synthetic checkpoints.

The towers are checked against transformers' SiglipVisionModel holding the same tensors (renamed;
timm's fused qkv split into q/k/v) at the native position grid, where neither resamples nor buckets
positions; the NaViT bucketing and the 2D sin-cos table against values worked by hand; the resampler
against the published formula written out in numpy (per head softmax attention). Tolerance 1e-5 abs
(fp32 both sides, different kernels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from minicpmv_models import SO400M_HEADS, TOWER, VISION_CONFIG_2_6, random_vision_state, vision_config

from vishwamai_edge.errors import SourceError
from vishwamai_edge.export.minicpmv_vision import load_vision, read_vision_layout
from vishwamai_edge.runtime.minicpmv import sincos_2d
from vishwamai_edge.runtime.minicpmv_slices import navit_position_ids, resample_pos_embed

WHERE = Path("ckpt")


def hf_siglip(state: dict, variant: str, hidden_act: str | None = None):
    """transformers' SiglipVisionModel with the checkpoint's tower tensors (timm names mapped onto HF's). For
    2.0 it computes what timm 0.9.10's so400m computes: 16 heads and the exact erf GELU (timm's nn.GELU)."""
    import transformers

    timm = {"num_attention_heads": SO400M_HEADS, "hidden_act": "gelu"} if variant == "2.0" else {}
    cfg = transformers.SiglipVisionConfig(**{**{k: v for k, v in VISION_CONFIG_2_6.items() if k != "model_type"},
                                             "hidden_act": "gelu_pytorch_tanh", **timm,
                                             **({"hidden_act": hidden_act} if hidden_act else {})}, layer_norm_eps=1e-6)
    model = transformers.SiglipVisionModel(cfg).eval()
    if variant == "2.6":
        mapped = {k[4:]: v for k, v in state.items() if k.startswith("vpm.")}
    else:
        C = TOWER["width"]
        mapped = {"embeddings.patch_embedding.weight": state["vpm.patch_embed.proj.weight"],
                  "embeddings.patch_embedding.bias": state["vpm.patch_embed.proj.bias"],
                  "embeddings.position_embedding.weight": state["vpm.pos_embed"][0],
                  "post_layernorm.weight": state["vpm.norm.weight"],
                  "post_layernorm.bias": state["vpm.norm.bias"]}
        for i in range(TOWER["layers"]):
            b, h = f"vpm.blocks.{i}", f"encoder.layers.{i}"
            for part in ("weight", "bias"):
                for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    mapped[f"{h}.self_attn.{name}.{part}"] = state[f"{b}.attn.qkv.{part}"][j * C:(j + 1) * C]
                mapped[f"{h}.self_attn.out_proj.{part}"] = state[f"{b}.attn.proj.{part}"]
                for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"),
                                     ("mlp.fc2", "mlp.fc2")):
                    mapped[f"{h}.{theirs}.{part}"] = state[f"{b}.{ours}.{part}"]
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("variant", ["2.0", "2.6"])
def test_tower_matches_transformers_siglip(variant):
    state = random_vision_state(variant)
    module, layout = load_vision(state, vision_config(variant), WHERE)
    assert layout.variant == variant and layout.n_layers == 3
    assert layout.n_heads == (SO400M_HEADS if variant == "2.0" else 2)
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = module.vpm(pixels, module.vpm.positions(4, 4))
        want = hf_siglip(state, variant)(pixel_values=pixels).last_hidden_state
    assert float((ours - want).abs().max()) < 1e-5


def test_navit_position_ids_by_hand():
    np.testing.assert_array_equal(navit_position_ids(4, 4, 4), np.arange(16))
    # side 4: boundaries .25 .5 .75; rows at 0, .5 -> buckets 0, 2; columns at 0, 1/3, 2/3 -> 0, 1, 2
    np.testing.assert_array_equal(navit_position_ids(2, 3, 4), [0, 1, 2, 8, 9, 10])


def test_sincos_table_by_hand():
    table = sincos_2d(8, 2, 3)  # D/4 = 2 frequencies: 1 and 1/100
    assert table.shape == (6, 8)
    row, col = 1, 2
    t = table[row * 3 + col]
    np.testing.assert_allclose(t[:4], [np.sin(2), np.sin(0.02), np.cos(2), np.cos(0.02)], rtol=1e-6)  # the column
    np.testing.assert_allclose(t[4:], [np.sin(1), np.sin(0.01), np.cos(1), np.cos(0.01)], rtol=1e-6)  # the row


def _layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


@pytest.mark.parametrize("variant", ["2.0", "2.6"])
def test_resampler_matches_published_formula(variant):
    state = random_vision_state(variant)
    module, layout = load_vision(state, vision_config(variant), WHERE)
    s = {k: v.double().numpy() for k, v in state.items() if k.startswith("resampler.")}
    feats = np.random.default_rng(2).standard_normal((1, 2 * 3, TOWER["width"])).astype(np.float32)
    with torch.no_grad():
        ours = module.resampler(torch.from_numpy(feats), torch.from_numpy(sincos_2d(256, 2, 3)))[0].double().numpy()

    D, H = layout.embed_dim, layout.embed_dim // 128
    kv = _layer_norm(feats[0].astype(np.float64) @ s["resampler.kv_proj.weight"].T, s["resampler.ln_kv.weight"],
                     s["resampler.ln_kv.bias"])
    q = _layer_norm(s["resampler.query"], s["resampler.ln_q.weight"], s["resampler.ln_q.bias"])
    if variant == "2.0":
        q = q + s["resampler.pos_embed"]
    k = kv + sincos_2d(D, 2, 3)
    w, b = s["resampler.attn.in_proj_weight"], s["resampler.attn.in_proj_bias"]
    qp, kp, vp = (x @ w[i * D:(i + 1) * D].T + b[i * D:(i + 1) * D] for i, x in enumerate((q, k, kv)))
    heads = []
    for h in range(H):
        cut = slice(h * D // H, (h + 1) * D // H)
        logits = qp[:, cut] @ kp[:, cut].T / np.sqrt(D // H)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        heads.append((p / p.sum(-1, keepdims=True)) @ vp[:, cut])
    out = np.concatenate(heads, -1) @ s["resampler.attn.out_proj.weight"].T + s["resampler.attn.out_proj.bias"]
    want = _layer_norm(out, s["resampler.ln_post.weight"], s["resampler.ln_post.bias"]) @ s["resampler.proj"]
    assert ours.shape == (8, 256)
    assert float(np.abs(ours - want).max()) < 1e-4


def test_variant_detected_from_tensors():
    state = random_vision_state("2.0")
    del state["resampler.pos_embed"]  # a timm tower with a resampler lacking 2.0's query positions
    with pytest.raises(SourceError, match="resampler.pos_embed"):
        read_vision_layout(state, {}, WHERE)
    assert read_vision_layout(random_vision_state("2.6"), vision_config("2.6"), WHERE).kv_proj


def test_missing_resampler_tensors():
    state = {k: v for k, v in random_vision_state("2.6").items() if not k.startswith("resampler.")}
    with pytest.raises(SourceError, match=r"ckpt: the checkpoint has no resampler tensors resampler\.query"):
        read_vision_layout(state, vision_config("2.6"), WHERE)


def test_a_2_0_tower_takes_its_heads_from_its_timm_name():
    state = random_vision_state("2.0")
    for name in ("vit_so400m_patch14_siglip_384", "vit_so400m_patch14_siglip_384.webli"):
        assert read_vision_layout(state, {"vision_encoder": name}, WHERE).n_heads == 16
    with pytest.raises(SourceError, match=r"ckpt/config.json: vision_encoder 'vit_base_patch16_224' is not a tower"):
        read_vision_layout(state, {"vision_encoder": "vit_base_patch16_224"}, WHERE)
    with pytest.raises(SourceError, match=r"vision_encoder None is not a tower|vision_encoder '' is not a tower"):
        read_vision_layout(state, {}, WHERE)
    w = state["vpm.patch_embed.proj.weight"]  # 100 wide: 16 heads cannot split it
    narrow = {**state, "vpm.patch_embed.proj.weight": w[:100]}
    with pytest.raises(SourceError, match="100 wide, which 16 heads"):
        read_vision_layout(narrow, vision_config("2.0"), WHERE)


def test_the_2_0_activation_is_timms_erf_gelu():
    """Against the tanh GELU the rows move by about 1e-4 of their largest value: the check can tell."""
    state = random_vision_state("2.0")
    module, _ = load_vision(state, vision_config("2.0"), WHERE)
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = module.vpm(pixels, module.vpm.positions(4, 4))
        erf = hf_siglip(state, "2.0")(pixel_values=pixels).last_hidden_state
        tanh = hf_siglip(state, "2.0", hidden_act="gelu_pytorch_tanh")(pixel_values=pixels).last_hidden_state
    scale = float(erf.abs().max())
    assert float((ours - erf).abs().max()) < 1e-5 * scale
    assert float((ours - tanh).abs().max()) > 1e-5 * scale


def test_missing_vision_config_heads():
    with pytest.raises(SourceError, match="vision_config.num_attention_heads"):
        read_vision_layout(random_vision_state("2.6"), {}, WHERE)


@pytest.mark.parametrize("variant", ["2.0", "2.6"])
def test_onnx_matches_reference_at_several_grids(variant, tmp_path):
    from vishwamai_edge.export.onnx.minicpmv import TOLERANCE, check_minicpmv_vision, export_minicpmv_vision

    module, layout = load_vision(random_vision_state(variant), vision_config(variant), WHERE)
    path = export_minicpmv_vision(module, layout, tmp_path / "vision.onnx")
    # the native 4 x 4 grid, and grids that resample (2.0) or bucket (2.6) the positions, one of them wider
    worst = check_minicpmv_vision(module, layout, path, [(4, 4), (3, 5), (2, 7)])
    assert worst < TOLERANCE, worst


@pytest.mark.parametrize("side, grid", [(27, (32, 32)), (27, (16, 40)), (27, (8, 3)), (27, (27, 26)), (4, (2, 7))])
def test_numpy_pos_embed_resample_matches_torch(side, grid):
    """The runtime's numpy resample of 2.0's pos_embed against F.interpolate(bicubic, antialias) (timm's)."""
    table = np.random.default_rng(0).standard_normal((side * side, 6)).astype(np.float32)
    g = torch.from_numpy(table).reshape(1, side, side, 6).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(g, size=grid, mode="bicubic", antialias=True, align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(-1, 6).numpy()
    assert float(np.abs(resample_pos_embed(table, side, *grid) - want).max()) < 2e-5  # measured <= 6e-6
