"""MiniCPM-V checkpoint folders (openbmb/MiniCPM-V-2, openbmb/MiniCPM-V-2_6), read without their remote code.

One folder, one config.json: architectures ["MiniCPMV"], model_type "minicpmv", the LLM's keys at
the top level, the multimodal keys beside them (query_num, patch_size, slice_mode, max_slice_nums,
scale_resolution; 2.6 also `version` 2.6, `slice_config` and `vision_config`). One set of
safetensors holds every part: `llm.*` (2.0: MiniCPM-2.4B, `llm.model.layers.N...`, `llm.lm_head`;
2.6: Qwen2-7B under the same names), `vpm.*` and `resampler.*` (export/minicpmv_vision.py).
2.0's config has no `version`: it is told by the MiniCPM keys (scale_emb, dim_model_base); the
tensors must then show the matching tower, so a version is never taken on trust alone.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SourceError
from ..runtime.minicpmv_slices import SCHEMES, SliceConfig
from .minicpm_lm import REQUIRED_KEYS as MINICPM_KEYS

ARCHITECTURES = ("MiniCPMV",)
LLM_ARCHITECTURE = {"2.0": ("MiniCPMForCausalLM", "minicpm"), "2.6": ("Qwen2ForCausalLM", "qwen2")}
# the transformers tokenizer each version's own (remote-code) tokenizer class derives from
TOKENIZER_CLASS = {"2.0": "LlamaTokenizer", "2.6": "Qwen2Tokenizer"}
# the multimodal keys, left out of the LLM's own folder
MULTIMODAL_KEYS = ("auto_map", "query_num", "image_size", "patch_size", "drop_vision_last_layer", "vision_encoder",
                   "slice_mode", "max_slice_nums", "scale_resolution", "mm_use_im_start_end", "slice_config",
                   "vision_config", "version", "batch_vision_input", "use_image_id", "vision_batch_size")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


@dataclass(frozen=True)
class MiniCPMVLayout:
    root: Path
    config: dict[str, Any]
    version: str  # "2.0" or "2.6"
    tensor_names: tuple[str, ...]

    @property
    def slices(self) -> SliceConfig:
        c = {**self.config, **(self.config.get("slice_config") or {})}
        return SliceConfig(self.version, int(c.get("max_slice_nums", 9)), int(c.get("scale_resolution", 448)),
                           int(c.get("patch_size", 14)), int(c.get("query_num", 64)))


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise SourceError(f"{folder} has no config.json")
    return json.loads(path.read_text(encoding="utf-8"))


def is_minicpmv(folder: Path) -> bool:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return False
    config = _config(folder)
    return config.get("model_type") == "minicpmv" or any(a in ARCHITECTURES for a in config.get("architectures") or [])


def _version(config: dict[str, Any], where: Path) -> str:
    raw = config.get("version")
    if raw is None:
        if all(k in config for k in ("scale_emb", "dim_model_base")):
            return "2.0"
        raise SourceError(f"{where}: no MiniCPM-V version (no `version` key and no MiniCPM LLM keys of 2.0)")
    version = f"{float(raw):.1f}" if isinstance(raw, (int, float)) else str(raw)
    if version not in SCHEMES:
        raise SourceError(f"{where}: MiniCPM-V version {version} is not supported; known: {', '.join(SCHEMES)}")
    return version


def _tensor_names(folder: Path) -> tuple[str, ...]:
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SourceError(f"{folder}: no *.safetensors weights")
    names: list[str] = []
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                names.extend(h.keys())
        except (OSError, SafetensorError) as exc:
            raise SourceError(f"{f} cannot be read as safetensors ({exc})") from None
    return tuple(names)


def read_minicpmv(folder: Path) -> MiniCPMVLayout:
    """The folder's version and parts, checked against its tensors; one-line errors name what is missing."""
    from .minicpmv_vision import RESAMPLER_TENSORS

    folder = Path(folder)
    config = _config(folder)
    where = folder / "config.json"
    version = _version(config, where)
    names = _tensor_names(folder)
    present = set(names)
    missing = [f"resampler.{n}" for n in RESAMPLER_TENSORS if f"resampler.{n}" not in present]
    if missing:
        raise SourceError(f"{folder}: the checkpoint has no resampler tensors {', '.join(missing[:4])}")
    if not any(n.startswith("llm.model.layers.") for n in names):
        raise SourceError(f"{folder}: the checkpoint has no language model tensors (llm.model.layers.*)")
    tower = "2.0" if "vpm.patch_embed.proj.weight" in present else \
        "2.6" if "vpm.embeddings.patch_embedding.weight" in present else None
    if tower is None:
        raise SourceError(f"{folder}: no vision tower tensors (vpm.patch_embed.* or vpm.embeddings.*)")
    if tower != version:
        raise SourceError(f"{folder}: config says MiniCPM-V {version} but the vision tower's tensors are {tower}'s")
    if version == "2.0":
        lacking = [k for k in MINICPM_KEYS if k not in config]
        if lacking:
            raise SourceError(f"{where}: MiniCPM-V 2.0's LLM needs {', '.join(lacking)}")
    return MiniCPMVLayout(folder, config, version, names)


def write_llm_folder(layout: MiniCPMVLayout, out: Path) -> Path:
    """The `llm.*` tensors as a plain HF folder (MiniCPMForCausalLM for 2.0, Qwen2ForCausalLM for 2.6)
    with the tokenizer, into `out` (the caller makes it atomic)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = Path(out)
    arch, model_type = LLM_ARCHITECTURE[layout.version]
    config = {k: v for k, v in layout.config.items() if k not in MULTIMODAL_KEYS}
    config.update(architectures=[arch], model_type=model_type)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = {}
    for f in sorted(layout.root.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            state.update({k[len("llm."):]: h.get_tensor(k) for k in h.keys() if k.startswith("llm.")})
    save_file(state, str(out / "model.safetensors"))
    for name in TOKENIZER_FILES:
        if (layout.root / name).is_file():
            shutil.copy2(layout.root / name, out / name)
    _without_remote_code(out / "tokenizer_config.json", TOKENIZER_CLASS[layout.version])
    return out


def _without_remote_code(path: Path, tokenizer_class: str) -> None:
    """The published tokenizer_config.json names OpenBMB's own tokenizer class through `auto_map` (code in the
    checkpoint, which transformers would ask to run, on a terminal, or refuse). The LLM folder names the
    transformers class it derives from instead: the same vocabulary, nothing to run, no question asked."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if "auto_map" not in config:
        return
    config.pop("auto_map")
    config["tokenizer_class"] = tokenizer_class
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


# timm vit_so400m_patch14_siglip_384 (MiniCPM-V 2.0's tower, no vision_config in its config.json)
SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "patch_size": 14}


def model_size(layout: MiniCPMVLayout, name: str) -> Any:
    """memory_plan's sizes: the LLM, tower + resampler, and the most rows one image takes ((1 + max slices) x queries)."""
    from dataclasses import replace

    from ..memory_plan import model_size as sizes

    config = layout.config
    llm = {k: v for k, v in config.items() if k not in MULTIMODAL_KEYS}
    size = sizes(llm, name)
    vision = {**SO400M, **(config.get("vision_config") or {})}
    c, inter = int(vision["hidden_size"]), int(vision["intermediate_size"])
    layers = int(vision["num_hidden_layers"]) - (1 if layout.version == "2.0" and config.get("drop_vision_last_layer",
                                                                                              True) else 0)
    tower = layers * (4 * c * c + 2 * c * inter) + 3 * int(vision["patch_size"]) ** 2 * c
    d, queries = int(config["hidden_size"]), layout.slices.query_num
    resampler = c * d + 4 * d * d + d * d + queries * d  # kv_proj, attention in/out, proj, queries
    return replace(size, encoder_params=float(tower + resampler),
                   image_tokens=(1 + layout.slices.max_slice_nums) * queries)


# -- the chat templates and the bundle's vision side -------------------------------------------

def _parts_macro(marker: str) -> str:
    # a message's parts joined by "\n", an image as the marker: MiniCPM-V 2.6's chat() (modeling_minicpmv.py:
    # images become "(<image>./</image>)", the contents "\n".join-ed); 2.0's chat() writes the image's
    # placeholder, "\n", then the text, which is the same for an image first
    return ("{%- macro text(content) -%}"
            "{%- if content is string -%}{{- content -}}"
            "{%- else -%}{%- for p in content -%}"
            "{%- if not loop.first -%}{{- " + json.dumps("\n") + " -}}{%- endif -%}"
            "{%- if p['type'] == 'image' -%}{{- " + json.dumps(marker) + " -}}"
            "{%- else -%}{{- p['text'] -}}{%- endif -%}"
            "{%- endfor -%}{%- endif -%}"
            "{%- endmacro -%}")


def chat_template(version: str) -> str:
    """2.0: MiniCPM's "<用户>question<AI>answer" turns, "<AI>" to answer (MiniCPMVTokenizer.apply_chat_template
    in the MiniCPM-V-2 folder; its chat() takes user/assistant only, so a system text goes first as it is);
    2.6: Qwen2's ChatML with its default system prompt (the folder's tokenizer_config.json, which
    chat() renders with add_generation_prompt)."""
    from ..runtime.minicpmv import IMAGE_MARKER

    head = _parts_macro(IMAGE_MARKER)
    if version == "2.0":
        return head + (
            "{%- for m in messages -%}"
            "{%- if m['role'] == 'system' -%}{{- text(m['content']) -}}"
            "{%- elif m['role'] == 'user' -%}{{- '<用户>' ~ text(m['content']) -}}"
            "{%- else -%}{{- '<AI>' ~ text(m['content']) -}}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '<AI>' -}}{%- endif -%}")
    return head + (
        "{%- for m in messages -%}"
        "{%- if loop.first and m['role'] != 'system' -%}"
        "{{- " + json.dumps("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n") + " -}}{%- endif -%}"
        "{{- '<|im_start|>' ~ m['role'] ~ " + json.dumps("\n") + " ~ text(m['content']) ~ '<|im_end|>' ~ "
        + json.dumps("\n") + " -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + json.dumps("<|im_start|>assistant\n") + " -}}{%- endif -%}")


def slicing(layout: MiniCPMVLayout) -> SliceConfig:
    """The slicing settings, preprocessor_config.json first (2.6 keeps scale_resolution and use_image_id
    there; MiniCPMV.chat asserts query_num, patch_size, use_image_id, max_slice_nums agree with config.json),
    then config.json (2.0 keeps them all at its top level)."""
    from dataclasses import replace

    pre_path = layout.root / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text(encoding="utf-8")) if pre_path.is_file() else {}
    base = layout.slices
    use_image_id = pre.get("use_image_id", layout.config.get("use_image_id"))
    config = replace(base, max_slice_nums=int(pre.get("max_slice_nums", base.max_slice_nums)),
                     scale_resolution=int(pre.get("scale_resolution", base.scale_resolution)),
                     patch_size=int(pre.get("patch_size", base.patch_size)),
                     use_image_id=bool(use_image_id) if use_image_id is not None else SCHEMES[layout.version][0])
    queries = int(pre.get("image_feature_size", config.query_num))
    if queries != config.query_num:
        raise SourceError(f"{pre_path}: image_feature_size {queries} but config.json query_num {config.query_num}")
    return config


def export_vision(layout: MiniCPMVLayout, graph: Path, positions: Path, threads: int | None = None) -> dict[str, Any]:
    """Tower + resampler -> ONNX (fp32) and the tower's position table -> .npy, the graph checked against
    our torch reference on an overview-sized grid and a non-square slice grid. The caller makes the
    paths atomic. Returns the manifest entry's numbers."""
    import numpy as np

    from ..errors import ExportError, require
    from .minicpmv_vision import load_vision, position_table
    from .onnx.minicpmv import REL_TOLERANCE, compare_minicpmv_vision, export_minicpmv_vision
    from .torch_state import safetensors_state

    torch = require("torch", "build")
    if threads:
        torch.set_num_threads(threads)
    state = safetensors_state(layout.root, "MiniCPM-V")
    module, vlayout = load_vision(state, layout.config, layout.root)
    table = position_table(state, vlayout)
    export_minicpmv_vision(module, vlayout, graph)
    with open(positions, "wb") as f:
        np.save(f, table.table)
    config = slicing(layout)
    n = max(config.scale_resolution // config.patch_size, 1)
    grids = [(n, n), (max(n - n // 4, 1), n + n // 3)]
    worst, rel = compare_minicpmv_vision(module, vlayout, graph, grids)
    if rel > REL_TOLERANCE:
        raise ExportError(f"{graph.name} does not match the torch reference: max |diff| {worst:.3g}, "
                          f"{rel:.3g} of the rows' range (tolerance {REL_TOLERANCE})")
    return {"variant": vlayout.variant, "pos_side": vlayout.pos_side, "hidden": vlayout.embed_dim,
            "vision_hidden": vlayout.width, "n_tokens": config.query_num,
            "check": {"max_abs_diff": worst, "max_rel_diff": rel, "grids": [list(g) for g in grids],
                      "rel_tolerance": REL_TOLERANCE}}


def manifest_entry(layout: MiniCPMVLayout, exported: dict[str, Any], graph_rel: str, positions_rel: str,
                   providers: list[str]) -> dict[str, Any]:
    """`encoders.image` for runtime/minicpmv.py's MiniCPMVImageEncoder."""
    config = slicing(layout)
    return {**exported, "kind": "minicpmv", "file": graph_rel, "positions": positions_rel, "providers": providers,
            "slicing": {"version": layout.version, "max_slice_nums": config.max_slice_nums,
                        "scale_resolution": config.scale_resolution, "patch_size": config.patch_size,
                        "query_num": config.query_num, "use_image_id": config.use_image_id},
            "markers": {"unk": config.unk, "image": ["<image>", "</image>"], "slice": ["<slice>", "</slice>"],
                        "image_id": ["<image_id>", "</image_id>"]},
            # llama.cpp's minicpm graph scales every input row by embedding_scale, MiniCPM-V 2.0 splices
            # its rows unscaled: they go in divided by scale_emb (runtime/minicpmv.py)
            "row_divisor": float(layout.config["scale_emb"]) if layout.version == "2.0" else 1.0}
