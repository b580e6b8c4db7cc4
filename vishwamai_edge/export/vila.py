"""VILA1.5 folders (NVlabs VILA, `LlavaLlamaModel`): the layout, our torch reference of the vision side, the prompt.

Read without VILA's remote code. The layout of Efficient-Large-Model/VILA1.5-3b:

    config.json     architectures ["LlavaLlamaModel"], model_type "llava_llama"; llm_cfg, vision_tower_cfg
                    and mm_projector_cfg are whole config dicts whose `_name_or_path` ("./llm",
                    "./vision_tower", "./mm_projector") names the sub-folder; mm_vision_select_layer -2,
                    mm_vision_select_feature "cls_patch", image_aspect_ratio "resize", s2 false.
                    (The VILA1.5-3b config TensorRT-LLM embeds in
                    tests/unittest/_torch/modeling/test_modeling_vila.py; NVlabs/VILA 1c88211
                    llava/model/utils.py `get_model_config` and NanoLLM nano_llm.py find the
                    sub-folders the same way.)
    llm/            LlamaForCausalLM (Sheared-LLaMA-2.7B: hidden 2560, 32 layers, vocab 32000), with the
                    Llama 2 SentencePiece tokenizer.
    vision_tower/   SiglipVisionModel (384 px, patch 14: a 27 x 27 grid, 27 layers, hidden 1152) and its
                    preprocessor_config.json.
    mm_projector/   config.json (mm_projector_type "mlp_downsample", model_type "v2l_projector") and
                    model.safetensors: layers.1 LayerNorm(4608), layers.2 Linear(4608, 2560),
                    layers.4 Linear(2560, 2560). layers.0 is the parameter-free DownSampleBlock and
                    layers.3 the GELU (NVlabs/VILA 1c88211 llava/model/multimodal_projector/base_projector.py).

The vision side, as VILA1.5's release code computes it (NVlabs/VILA 1c88211
multimodal_encoder/vision_encoder.py and base_projector.py; NanoLLM's copy agrees):
- features are `hidden_states[mm_vision_select_layer]` of the tower, before post_layernorm;
  "cls_patch" keeps every token (SigLIP has no CLS);
- DownSampleBlock: the token grid (h x w, square) padded to even sides with a zero row at the
  bottom and a zero column at the right; every 2 x 2 block becomes one vector
  x[2i, 2j] | x[2i, 2j+1] | x[2i+1, 2j] | x[2i+1, 2j+1], and the blocks come out column by
  column (token t = j * h/2 + i). Later NVILA code (2024-12, and TensorRT-LLM's PyTorch
  modeling_vila.py) adds a permute that emits them row by row; VILA1.5 was trained without it.
  At 27 x 27: 28 x 28 -> 196 tokens of 4 x 1152 = 4608;
- then LayerNorm (torch's eps 1e-5) -> Linear -> GELU (erf) -> Linear, to the LLM's width.

Preprocessing (llava/mm_utils.py `process_image`): "resize" is one resize to the tower's size
(Pillow's default BICUBIC; SiglipImageProcessor's own resize is then a no-op), "pad" first pads
to a square with the mean colour (`expand2square`); then rescale and mean = std = 0.5.

The prompt is `conv_vicuna_v1` (llava/conversation.py; TensorRT-LLM maps vila1.5-3b to it):
"<system> USER: <image>\\n<question> ASSISTANT: <answer></s>USER: ...". `<image>` is no
vocabulary entry: VILA splits the prompt at it and splices IMAGE_TOKEN_INDEX (-200) between
the pieces, each piece tokenized alone; the runtime does the same (`image_token.id` null).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError, SourceError, quiet_transformers, require
from ..runtime.preprocess import ImageProcessorSpec, default_spec, spec_from_preprocessor_config
from ..sources.folders import is_vila
from .torch_state import load_exact, safetensors_state

PROJECTOR_TYPES = ("mlp_downsample",)
ASPECT_RATIOS = {"resize": False, "pad": True}  # image_aspect_ratio -> pad to square first
# "cls_patch" keeps every token; "patch" would drop a real SigLIP patch and leave no square grid
SELECT_FEATURES = ("cls_patch",)
IMAGE_TEXT = "<image>"
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# conv_vicuna_v1, SeparatorStyle.TWO: system + " ", "USER: " + msg + " ", "ASSISTANT: " + msg + "</s>",
# and "ASSISTANT:" to answer; an image part is "<image>\n" (run_vila.py puts it before the question).
VICUNA_V1_TEMPLATE = (
    "{%- set ns = namespace(system=" + json.dumps(VICUNA_V1_SYSTEM) + ") -%}"
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for p in content -%}"
    "{%- if p['type'] == 'image' -%}{{- " + json.dumps(IMAGE_TEXT + "\n") + " -}}"
    "{%- else -%}{{- p['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = text(m['content']) -%}{%- endfor -%}"
    "{{- ns.system ~ ' ' -}}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' -%}{{- 'USER: ' ~ text(m['content']) ~ ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' ~ text(m['content']) ~ '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
LLM_FILES_SKIPPED = ("tokenizer_config.json",)  # rewritten with the chat template


@dataclass(frozen=True)
class VilaLayout:
    """A checked VILA folder: where each part is and how the vision side is wired."""

    root: Path
    config: dict[str, Any]
    llm_dir: Path
    tower_dir: Path
    projector_dir: Path
    projector_type: str
    select_layer: int
    select_feature: str
    pad_to_square: bool

    @property
    def tower_config(self) -> dict[str, Any]:
        return _json(self.tower_dir / "config.json")

    @property
    def llm_config(self) -> dict[str, Any]:
        return _json(self.llm_dir / "config.json")

    @property
    def grid(self) -> int:
        t = self.tower_config
        return int(t["image_size"]) // int(t["patch_size"])

    @property
    def n_tokens(self) -> int:
        return math.ceil(self.grid / 2) ** 2

    def memory_config(self) -> dict[str, Any]:
        """What memory_plan.model_size reads: the LLM's and the tower's sizes."""
        return {"text_config": self.llm_config, "vision_config": self.tower_config}

    def projector_params(self) -> int:
        v, h = int(self.tower_config["hidden_size"]), int(self.llm_config["hidden_size"])
        return 2 * 4 * v + 4 * v * h + h + h * h + h


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SourceError(f"{path} is missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path} cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path} is not a JSON object")
    return data


def _part_dir(root: Path, config: dict[str, Any], key: str) -> Path:
    """The sub-folder of one part: the basename of its `_name_or_path`, else the key without `_cfg`."""
    cfg = config.get(key)
    name = None
    if isinstance(cfg, dict):
        name = cfg.get("_name_or_path")
    elif isinstance(cfg, str):  # some VILA versions store the path itself
        name = cfg
    sub = os.path.basename(str(name).rstrip("/")) if name else ""
    return root / (sub or key.removesuffix("_cfg"))


def read_vila(folder: Path) -> VilaLayout:
    """Check a VILA folder and say where its parts are; one-line errors name what is wrong."""
    root = Path(folder)
    config = _json(root / "config.json")
    if not is_vila(root):
        raise SourceError(f"{root}/config.json is not a VILA config (architectures {config.get('architectures')})")
    if config.get("s2"):
        raise SourceError(f"{root}: S2 multi-scale VILA models (s2: true) are not supported; VILA1.5 without "
                          "S2 is (e.g. VILA1.5-3b)")
    parts = {}
    for key, what in (("llm_cfg", "the language model"), ("vision_tower_cfg", "the vision tower"),
                      ("mm_projector_cfg", "the projector")):
        d = _part_dir(root, config, key)
        if not d.is_dir():
            raise SourceError(f"{root}: {d.name}/ ({what}, named by config.json {key}) is missing")
        if not (d / "config.json").is_file():
            raise SourceError(f"{d}: config.json is missing ({what})")
        parts[key] = d
    projector_cfg = _json(parts["mm_projector_cfg"] / "config.json")
    ptype = projector_cfg.get("mm_projector_type")
    if ptype not in PROJECTOR_TYPES:
        raise SourceError(f"{parts['mm_projector_cfg']}/config.json: mm_projector_type {ptype!r} is not supported; "
                          f"VILA1.5 uses {', '.join(PROJECTOR_TYPES)}")
    tower = _json(parts["vision_tower_cfg"] / "config.json")
    if tower.get("model_type") != "siglip_vision_model":
        raise SourceError(f"{parts['vision_tower_cfg']}/config.json: vision tower {tower.get('model_type')!r} is not "
                          "supported; VILA1.5's is siglip_vision_model")
    aspect = config.get("image_aspect_ratio", "resize")
    if aspect not in ASPECT_RATIOS:
        raise SourceError(f"{root}/config.json: image_aspect_ratio {aspect!r} is not supported "
                          f"({', '.join(ASPECT_RATIOS)})")
    feature = config.get("mm_vision_select_feature", "cls_patch")
    if feature not in SELECT_FEATURES:
        raise SourceError(f"{root}/config.json: mm_vision_select_feature {feature!r} is not supported "
                          f"({', '.join(SELECT_FEATURES)})")
    layer = config.get("mm_vision_select_layer", -2)
    if not isinstance(layer, int):
        raise SourceError(f"{root}/config.json: mm_vision_select_layer must be one integer, not {layer!r}")
    return VilaLayout(root, config, parts["llm_cfg"], parts["vision_tower_cfg"], parts["mm_projector_cfg"], ptype,
                      layer, feature, ASPECT_RATIOS[aspect])


def image_spec(layout: VilaLayout) -> ImageProcessorSpec:
    """The tower's preprocessor_config.json (SigLIP's processor), or SigLIP's defaults at its size;
    `image_aspect_ratio: pad` pads to a square first."""
    size = int(layout.tower_config["image_size"])
    pre = layout.tower_dir / "preprocessor_config.json"
    if pre.is_file():
        spec = spec_from_preprocessor_config(_json(pre), pad_to_square=layout.pad_to_square)
    else:
        from dataclasses import replace

        spec = replace(default_spec("siglip", (size, size)), pad_to_square=layout.pad_to_square)
    if spec.output_size != (size, size):
        raise SourceError(f"{pre}: images come out {spec.output_size}, the tower takes {size}x{size}")
    return spec


# -- our torch reference of the vision side -----------------------------------------------


def downsample_2x2(x: Any, side: int, c: int) -> Any:
    """(batch, side*side, c) -> (batch, ceil(side/2)^2, 4c): VILA1.5's DownSampleBlock. `side` and `c`
    are Python ints (from the config), so the ONNX graph's shapes are constants but for the batch."""
    torch = require("torch", "build")
    grid = x.reshape(-1, side, side, c)  # (batch, row, col, c)
    if side % 2:  # pad, not concat with zeros: the batch axis stays symbolic in the ONNX graph
        grid = torch.nn.functional.pad(grid, (0, 0, 0, 1, 0, 1))  # a zero column right, a zero row below
        side += 1
    half = side // 2
    pairs = grid.reshape(-1, side, half, 2 * c)  # [r, j] = x[r, 2j] | x[r, 2j+1]
    by_column = pairs.permute(0, 2, 1, 3)  # [j, r]
    return by_column.reshape(-1, half * half, 4 * c)  # [j, i] = rows 2i and 2i+1 of column pair j


def make_downsample_projector(vision_hidden: int, llm_hidden: int, side: int) -> Any:
    """mlp_downsample with VILA's module indices, so mm_projector/model.safetensors loads as it is."""
    torch = require("torch", "build")
    nn = torch.nn

    class DownsampleProjector(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Identity(), nn.LayerNorm(4 * vision_hidden),
                                        nn.Linear(4 * vision_hidden, llm_hidden), nn.GELU(),
                                        nn.Linear(llm_hidden, llm_hidden))

        def forward(self, features):
            return self.layers[1:](downsample_2x2(features, side, vision_hidden))

    return DownsampleProjector()


@dataclass
class VilaVision:
    module: Any  # pixels (batch, 3, S, S) -> (batch, n_tokens, llm_hidden)
    spec: ImageProcessorSpec
    image_size: tuple[int, int]
    vision_hidden: int
    select_layer: int
    select_feature: str


def load_vila_vision(folder: Path | VilaLayout) -> VilaVision:
    """Tower (at the selected layer) + mlp_downsample projector in fp32, from the folder's tensors."""
    torch = require("torch", "build")
    layout = folder if isinstance(folder, VilaLayout) else read_vila(folder)
    transformers = quiet_transformers()
    if not any(layout.tower_dir.glob("*.safetensors")):
        raise SourceError(f"{layout.tower_dir}: no *.safetensors weights (the vision tower)")
    try:  # transformers maps the saved names (vision_model.*) onto its modules itself
        tower, info = transformers.SiglipVisionModel.from_pretrained(layout.tower_dir, dtype=torch.float32,
                                                                     output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{layout.tower_dir}: the vision tower cannot be loaded ({str(exc).splitlines()[0]})") from None
    missing = [k for k in info["missing_keys"] if ".head." not in f".{k}"]  # the pooling head is never used
    if missing or info["unexpected_keys"] or info.get("mismatched_keys"):
        raise SourceError(f"{layout.tower_dir}: the vision tower's tensors do not match its config (missing "
                          f"{missing[:3]}, unexpected {list(info['unexpected_keys'])[:3]})")
    tower_cfg = tower.config
    llm_hidden = int(layout.llm_config["hidden_size"])
    vision_hidden = int(tower_cfg.hidden_size)
    projector = make_downsample_projector(vision_hidden, llm_hidden, layout.grid)
    pstate = {k.removeprefix("model.mm_projector.").removeprefix("mm_projector."): v.float()
              for k, v in safetensors_state(layout.projector_dir, "the projector").items()}
    load_exact(projector, pstate, layout.projector_dir, "projector")
    n_layers = tower_cfg.num_hidden_layers
    if not -n_layers - 1 <= layout.select_layer <= n_layers:
        raise SourceError(f"{layout.root}/config.json: mm_vision_select_layer {layout.select_layer} is outside the "
                          f"tower's {n_layers} layers")
    select = layout.select_layer

    class VilaVisionModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tower, self.projector = tower, projector

        def forward(self, pixel_values):
            # hidden_states[0] is the patch embedding, [i] the i-th layer's output (no post_layernorm);
            # layers past the selected one are dead code the ONNX exporter drops
            out = self.tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
            return self.projector(out.hidden_states[select])

    size = int(tower_cfg.image_size)
    return VilaVision(VilaVisionModule().eval(), image_spec(layout), (size, size), vision_hidden, select,
                      layout.select_feature)


# -- the language model -------------------------------------------------------------------


def write_llm_folder(layout: VilaLayout, out: Path) -> Path:
    """llm/ as a plain HF folder with the VILA1.5 chat template, into `out` (the caller makes it atomic).
    Weights are hard-linked where the disk allows: a 3B model is 5 GB."""
    out = Path(out)
    if not any(layout.llm_dir.glob("*.safetensors")):
        raise SourceError(f"{layout.llm_dir}: no *.safetensors weights (a VILA *-AWQ folder is read by its .pt)")
    for f in sorted(layout.llm_dir.iterdir()):
        if not f.is_file() or f.name in LLM_FILES_SKIPPED:
            continue
        try:
            os.link(f, out / f.name)
        except OSError:
            shutil.copy2(f, out / f.name)
    with_template(layout.llm_dir, out)
    return out


def with_template(src: Path, out: Path) -> None:
    """out/tokenizer_config.json = src's with VILA1.5's chat template (where transformers and gguf-py read it)."""
    path = Path(src) / "tokenizer_config.json"
    config = _json(path) if path.is_file() else {}
    config["chat_template"] = VICUNA_V1_TEMPLATE
    (Path(out) / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def check_llm(layout: VilaLayout) -> None:
    arch = (layout.llm_config.get("architectures") or ["?"])[0]
    if arch != "LlamaForCausalLM":
        raise ExportError(f"{layout.llm_dir}/config.json: the language model is {arch}; VILA1.5's is LlamaForCausalLM")


def model_size(layout: VilaLayout, name: str) -> Any:
    """memory_plan's sizes: the LLM, the tower + mlp_downsample projector, and 196 rows an image at 384 px."""
    from dataclasses import replace

    from ..memory_plan import model_size as sizes

    size = sizes(layout.memory_config(), name)
    t = layout.tower_config
    v, inter, n = int(t["hidden_size"]), int(t.get("intermediate_size", 4 * int(t["hidden_size"]))), \
        int(t["num_hidden_layers"])
    tower = n * (4 * v * v + 2 * v * inter) + 3 * int(t["patch_size"]) ** 2 * v
    return replace(size, encoder_params=float(tower + layout.projector_params()), image_tokens=layout.n_tokens)
