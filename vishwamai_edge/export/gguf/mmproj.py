"""LLaVA-1.5 (llava-hf layout, CLIP tower) vision side -> llama.cpp mmproj GGUF (libmtmd).

Key and tensor names are the ones llama.cpp's CLIP loader reads; the citations are to the
llama.cpp vendored in llama-cpp-python 0.3.36 (`tools/mtmd/clip-impl.h` names them,
`tools/mtmd/clip.cpp` `load_hparams`/`load_tensors` reads them, `tools/mtmd/models/llava.cpp`
builds the graph); tests/export/test_mmproj.py checks the file in libmtmd. The layout follows
the legacy `convert_image_encoder_to_gguf.py`, with one
difference: CLIP's fc1/fc2 are written as `ffn_up`/`ffn_down` (their real meaning), which
clip.cpp accepts without its "swapped ffn" fix-up for old files.

Known llama.cpp defect, not worked around here: its llava graph puts the CLS row after the
patches while still feeding positions 0..N and picking rows 1..N (ggml-org/llama.cpp #25814, fix
in PR #25844); the vendored 0.3.36 build has it. This file is the standard layout, correct for a
llama.cpp with the fix; no choice of weights can undo the wrong row selection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import ExportError
from ...fsutil import atomic_file

DTYPES = ("f32", "f16")


@dataclass
class MmprojInfo:
    path: Path
    dtype: str
    image_size: int
    patch_size: int
    n_image_tokens: int       # rows per image handed to the LLM
    block_count: int          # CLIP blocks written (those after the feature layer are dropped)
    feature_layers: list[int]  # hidden-state indices, 0 = embeddings, as clip.vision.feature_layer
    projection_dim: int


def _feature_layers(layer: int | list[int], n_layers: int) -> list[int]:
    """HF `vision_feature_layer` -> non-negative hidden-state indices (0 = the embeddings).

    llama.cpp marks "unset" with -1, so converters must write non-negative values
    (clip.cpp, `KEY_FEATURE_LAYERS` note), and it stacks feature layers in encoder order
    (models/llava.cpp `embedding_stack`), whereas transformers concatenates them in list order.
    """
    layers = [layer] if isinstance(layer, int) else list(layer)
    out = [v if v >= 0 else n_layers + 1 + v for v in layers]
    if any(v < 0 or v > n_layers for v in out):
        raise ExportError(f"vision_feature_layer {layer!r} is out of range for a "
                          f"{n_layers}-layer vision tower")
    if out != sorted(set(out)):
        raise ExportError(f"vision_feature_layer {layer!r} is not in ascending order; llama.cpp stacks "
                          "feature layers in encoder order, so the mmproj would not match the model")
    return out


def _load_state_dict(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{hf_dir} has no .safetensors weights")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except TypeError:  # bf16 has no numpy dtype: go through torch
            import torch
            from safetensors.torch import load_file as load_torch

            tensors.update({k: v.to(torch.float32).numpy() for k, v in load_torch(f).items()})
    return tensors


def _strip_prefix(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Names as "vision_tower.X" / "multi_modal_projector.X", whichever llava-hf spelling was
    saved: hub checkpoints ("vision_tower.vision_model.X"), transformers 4.5x
    ("model.vision_tower.vision_model.X") and 5.x ("vision_tower.X")."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("model.")
        if k.startswith("vision_tower."):
            out["vision_tower." + k.removeprefix("vision_tower.").removeprefix("vision_model.")] = v
        elif k.startswith("multi_modal_projector."):
            out[k] = v
    return out


def _image_stats(hf_dir: Path) -> tuple[list[float], list[float]]:
    pre = hf_dir / "preprocessor_config.json"
    if not pre.is_file():
        raise ExportError(f"{hf_dir} has no preprocessor_config.json (image mean/std are needed)")
    cfg = json.loads(pre.read_text())
    try:
        return [float(x) for x in cfg["image_mean"]], [float(x) for x in cfg["image_std"]]
    except KeyError as e:
        raise ExportError(f"{pre} has no {e.args[0]}") from None


def write_mmproj(hf_dir: Path, out_path: Path, dtype: str = "f32") -> MmprojInfo:
    """Write the mmproj GGUF of a llava-hf LlavaForConditionalGeneration folder (CLIP tower)."""
    import gguf

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if dtype not in DTYPES:
        raise ExportError(f"unknown mmproj dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    config = json.loads((hf_dir / "config.json").read_text())
    if "LlavaForConditionalGeneration" not in config.get("architectures", []):
        raise ExportError(f"{hf_dir} is not a LlavaForConditionalGeneration folder")
    vc = config.get("vision_config", {})
    if vc.get("model_type") != "clip_vision_model":
        raise ExportError(f"the vision tower of {hf_dir} is {vc.get('model_type')!r}; the mmproj writer "
                          "handles only CLIP (LLaVA-1.5)")
    if config.get("vision_feature_select_strategy", "default") != "default":
        # llama.cpp always drops the CLS row before the projector when v.class_embd exists
        # (clip.cpp, `patches` input: patch_offset = class_embedding ? 1 : 0).
        raise ExportError("vision_feature_select_strategy 'full' (keep CLS) cannot be expressed in an mmproj")
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ExportError(f"projector_hidden_act {config['projector_hidden_act']!r} is not gelu; "
                          "llama.cpp's mlp projector applies gelu")
    hidden_act = vc.get("hidden_act", "quick_gelu")
    if hidden_act not in ("quick_gelu", "gelu"):
        raise ExportError(f"CLIP hidden_act {hidden_act!r} is not supported by llama.cpp's CLIP graph")

    n_layers = int(vc["num_hidden_layers"])
    feature_layers = _feature_layers(config.get("vision_feature_layer", -2), n_layers)
    # Blocks past the deepest feature layer never run: drop them, as the legacy converter does.
    block_count = max(feature_layers)
    mean, std = _image_stats(hf_dir)
    image_size, patch_size = int(vc["image_size"]), int(vc["patch_size"])
    eps = float(vc.get("layer_norm_eps", 1e-5))

    sd = _strip_prefix(_load_state_dict(hf_dir))
    vt, mm = "vision_tower.", "multi_modal_projector."
    tensors: list[tuple[str, str]] = [
        ("v.patch_embd.weight", vt + "embeddings.patch_embedding.weight"),  # TN_PATCH_EMBD
        ("v.class_embd", vt + "embeddings.class_embedding"),                 # TN_CLASS_EMBD
        ("v.position_embd.weight", vt + "embeddings.position_embedding.weight"),  # TN_POS_EMBD
        ("v.pre_ln.weight", vt + "pre_layrnorm.weight"),                     # TN_LN_PRE (HF's spelling)
        ("v.pre_ln.bias", vt + "pre_layrnorm.bias"),
        # TN_LLAVA_PROJ "mm.%d.%s": mm.0 = linear_1, gelu, mm.2 = linear_2 (models/llava.cpp)
        ("mm.0.weight", mm + "linear_1.weight"), ("mm.0.bias", mm + "linear_1.bias"),
        ("mm.2.weight", mm + "linear_2.weight"), ("mm.2.bias", mm + "linear_2.bias"),
    ]
    blk = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2",
           "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}  # TN_ATTN_*, TN_LN_1/2, TN_FFN_UP/DOWN
    for i in range(block_count):
        for gg, hf in blk.items():
            for part in ("weight", "bias"):
                tensors.append((f"v.blk.{i}.{gg}.{part}", f"{vt}encoder.layers.{i}.{hf}.{part}"))
    # post_layernorm is not written: LLaVA takes hidden_states[feature_layer], before it, and
    # llava.cpp would apply v.post_ln to the last block's output if it were present.
    missing = [hf for _, hf in tensors if hf not in sd]
    if missing:
        raise ExportError(f"{hf_dir} lacks {len(missing)} vision tensors, e.g. {missing[0]}")
    projection_dim = int(sd[mm + "linear_2.weight"].shape[0])

    with atomic_file(out_path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="clip")  # general.architecture = clip
        w.add_name(hf_dir.name)
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        # clip.cpp load: KEY_HAS_VISION_ENC, KEY_PROJ_TYPE ("mlp" -> PROJECTOR_TYPE_MLP, clip-impl.h)
        w.add_bool("clip.has_vision_encoder", True)
        w.add_bool("clip.has_llava_projector", True)  # legacy flag; clip.cpp derives it from the type
        w.add_string("clip.projector_type", "mlp")
        # load_hparams "other hparams": KEY_N_EMBD, KEY_N_HEAD, KEY_N_FF, KEY_N_BLOCK, KEY_PROJ_DIM,
        # KEY_LAYER_NORM_EPS, KEY_IMAGE_SIZE, KEY_PATCH_SIZE, KEY_IMAGE_MEAN/STD, KEY_FEATURE_LAYERS
        w.add_uint32("clip.vision.image_size", image_size)
        w.add_uint32("clip.vision.patch_size", patch_size)
        w.add_uint32("clip.vision.embedding_length", int(vc["hidden_size"]))
        w.add_uint32("clip.vision.feed_forward_length", int(vc["intermediate_size"]))
        w.add_uint32("clip.vision.projection_dim", projection_dim)
        w.add_uint32("clip.vision.attention.head_count", int(vc["num_attention_heads"]))
        w.add_float32("clip.vision.attention.layer_norm_epsilon", eps)
        w.add_uint32("clip.vision.block_count", block_count)
        # With feature_layer set, llava.cpp runs max(feature_layer) blocks and takes that output;
        # without it, it would run block_count - 1 (its "second to last" default).
        w.add_array("clip.vision.feature_layer", feature_layers)
        w.add_array("clip.vision.image_mean", mean)
        w.add_array("clip.vision.image_std", std)
        # KEY_USE_GELU: unset -> gelu_quick (CLIP's quick_gelu)
        w.add_bool("clip.use_gelu", hidden_act == "gelu")
        for name, hf in tensors:
            data = np.ascontiguousarray(sd[hf], dtype=np.float32)
            if name == "v.class_embd":
                data = data.reshape(-1)
            if dtype == "f16" and name.endswith(".weight") and data.ndim >= 2:
                data = data.astype(np.float16)
            w.add_tensor(name, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    n_tokens = (image_size // patch_size) ** 2  # CLS dropped
    return MmprojInfo(out_path, dtype, image_size, patch_size, n_tokens, block_count,
                      feature_layers, projection_dim)
