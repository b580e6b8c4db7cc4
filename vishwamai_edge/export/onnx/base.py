"""Vision tower + projector -> one ONNX graph: the graph, its check.

The tower's family (CLIP, SigLIP: which towers, how their pixels are prepared) comes from the one encoder
registry, train/encoders.py; the graph is shared: hidden state(s) of the chosen layer(s), CLS dropped or kept
as the LLaVA config says, then the projector, exactly as transformers 5's `LlavaModel.get_image_features`
computes them (tests check it against that method).

Graph contract (what `runtime.encoders.VisionEncoder` relies on):
  input  `pixel_values` float32 (batch, 3, H, W), batch dynamic, H and W fixed
  output `image_embeds` float32 (batch, tokens, llm_hidden)
I/O stays float32 for every dtype; fp16 and int8 are inside the graph.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ExportError, quiet_transformers, require
from ...runtime.encoders import INPUT, OUTPUT
from ...runtime.preprocess import ImageProcessorSpec, default_spec, spec_from_preprocessor_config

def family_for(config: Any) -> LlavaVision:
    """The vision side of a LLaVA config, its tower found in the one encoder registry (train/encoders.py)."""
    from ...train.encoders import hf_tower_class, hf_tower_types

    model_type = getattr(config.vision_config, "model_type", None)
    tower = hf_tower_class(model_type)
    if tower is None:
        raise ExportError(f"vision tower {model_type!r} has no ONNX exporter; supported: "
                          f"{', '.join(hf_tower_types())}")
    return LlavaVision(config, tower.name, tower.processor_kind)


class LlavaVision:
    """A LLaVA config's vision side: the tower's family, the feature layer(s) and the token selection."""

    def __init__(self, config: Any, name: str, processor_kind: str):
        self.config = config
        self.name = name
        self.processor_kind = processor_kind
        self.vision = config.vision_config
        self.layers: int | list[int] = config.vision_feature_layer
        self.strategy: str = config.vision_feature_select_strategy
        if self.strategy not in ("default", "full"):
            raise ExportError(
                f"vision_feature_select_strategy {self.strategy!r} is not supported (default or full)"
            )

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.vision.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def default_spec(self) -> ImageProcessorSpec:
        """Preprocessing when the model comes without a preprocessor_config.json."""
        return default_spec(self.processor_kind, self.image_size)

    def graph(self, tower: Any, projector: Any) -> Any:
        return _tower_and_projector(tower, projector, self.layers, drop_first=self.strategy == "default")


def _tower_and_projector(tower: Any, projector: Any, layers: int | list[int], drop_first: bool) -> Any:
    """The image half of LLaVA as one torch module: the thing exported and checked."""
    torch = require("torch", "build")
    selected = [layers] if isinstance(layers, int) else list(layers)

    class TowerAndProjector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = tower
            self.projector = projector

        def forward(self, pixel_values):
            # All hidden states come back; layers past the last one used are dead code,
            # which the ONNX exporter drops.
            out = self.tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
            # "default" drops the first token (CLIP's CLS), as LlavaModel.get_image_features does
            picked = [out.hidden_states[i][:, 1:] if drop_first else out.hidden_states[i] for i in selected]
            features = picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)
            return self.projector(features)

    return TowerAndProjector()


# -- loading the vision half of a LLaVA folder --------------------------------------------


@dataclass
class VisionSource:
    config: Any  # a transformers LlavaConfig
    tower: Any
    projector: Any
    spec: ImageProcessorSpec | None  # from preprocessor_config.json, when the folder has one


def load_vision_source(source: Path | str | Any) -> VisionSource:
    """The vision tower and projector (fp32) of a LLaVA folder or an already loaded LLaVA model.

    From a folder only their tensors are read, so a 7B checkpoint costs its ~0.6 GB of
    vision weights, not the language model's.
    """
    torch = require("torch", "build")
    if not isinstance(source, (str, Path)):
        inner = getattr(source, "model", source)  # LlavaForConditionalGeneration or LlavaModel
        if not hasattr(inner, "vision_tower") or not hasattr(inner, "multi_modal_projector"):
            raise ExportError(
                f"{type(source).__name__} has no vision_tower / multi_modal_projector (not a LLaVA model)"
            )
        # copies: converting to fp32 must not change the caller's model
        return VisionSource(source.config, copy.deepcopy(inner.vision_tower).float().eval(),
                            copy.deepcopy(inner.multi_modal_projector).float().eval(), None)

    hf_dir = Path(source)
    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"{hf_dir} is not a model folder (no config.json)")
    transformers = quiet_transformers()
    config = transformers.AutoConfig.from_pretrained(hf_dir, trust_remote_code=False)
    if getattr(config, "model_type", None) != "llava":
        raise ExportError(f"{hf_dir}: model type {config.model_type!r} is not LLaVA; the vision export reads "
                          f"LlavaForConditionalGeneration folders")
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    tower = transformers.AutoModel.from_config(config.vision_config, dtype=torch.float32)
    projector = LlavaMultiModalProjector(config).float()
    tower_sd, projector_sd = _vision_state_dicts(hf_dir)
    for name, module, sd in (("vision tower", tower, tower_sd), ("projector", projector, projector_sd)):
        missing, unexpected = module.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ExportError(f"{hf_dir}: the {name}'s weights do not match its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    spec = None
    pre = hf_dir / "preprocessor_config.json"
    if pre.is_file():
        spec = spec_from_preprocessor_config(json.loads(pre.read_text()))
    return VisionSource(config, tower.eval(), projector.eval(), spec)


def _vision_state_dicts(hf_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tower and projector tensors, from either llava-hf layout.

    Hub checkpoints say `vision_tower.vision_model.X` and `multi_modal_projector.X`;
    transformers 5 saves `model.vision_tower.X` (it drops CLIP's `vision_model.`
    prefix and nests everything under `model.`).
    """
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{hf_dir} has no *.safetensors weights")
    tower: dict[str, Any] = {}
    projector: dict[str, Any] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():  # noqa: SIM118  (safe_open is not iterable)
                name = key.removeprefix("model.")
                if name.startswith("vision_tower."):
                    short = name.removeprefix("vision_tower.").removeprefix("vision_model.")
                    tower[short] = h.get_tensor(key).float()
                elif name.startswith("multi_modal_projector."):
                    projector[name.removeprefix("multi_modal_projector.")] = h.get_tensor(key).float()
    if not tower or not projector:
        raise ExportError(f"{hf_dir}: no vision_tower / multi_modal_projector tensors in its safetensors")
    return tower, projector


# -- export and check -------------------------------------------------------------------------

OPSET = 17  # LayerNormalization is an op from 17; ONNX Runtime >= 1.17 and TensorRT 8.6+ read it
DTYPES = ("fp32", "fp16", "int8")
# Per dtype: the largest allowed max |onnx - torch| / max |torch| and the smallest allowed
# cosine of any output token against torch's. Measured (random weights) on the tiny test
# models and at CLIP ViT-L/14-336 + 4096 projector (benchmarks/vision_encoder.py):
#   fp32  4e-7 .. 1e-6 relative, cosine 1.0
#   fp16  5e-4 .. 9e-4 relative, cosine 0.999999
#   int8  2e-2 .. 5e-2 relative, cosine 0.998 .. 0.9996
TOLERANCE: dict[str, dict[str, float]] = {
    "fp32": {"max_rel_diff": 1e-4, "min_cosine": 0.99999},
    "fp16": {"max_rel_diff": 1e-2, "min_cosine": 0.999},
    "int8": {"max_rel_diff": 0.1, "min_cosine": 0.99},
}


@dataclass
class VisionExportInfo:
    path: Path
    family: str
    dtype: str
    opset: int
    image_size: tuple[int, int]
    n_tokens: int
    hidden: int  # the language model's width: image_embeds' last axis
    vision_hidden: int
    feature_layer: int | list[int]
    select_strategy: str
    preprocess: dict[str, Any]  # ImageProcessorSpec.to_dict()
    check: dict[str, Any] = field(default_factory=dict)
    io_dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.path.name, "family": self.family, "dtype": self.dtype, "io_dtype": self.io_dtype,
            "opset": self.opset, "input": INPUT, "output": OUTPUT, "image_size": list(self.image_size),
            "n_tokens": self.n_tokens, "hidden": self.hidden, "vision_hidden": self.vision_hidden,
            "feature_layer": self.feature_layer, "select_strategy": self.select_strategy,
            "preprocess": self.preprocess, "check": self.check,
        }


def export_vision(
    source: Path | str | Any,
    out_path: Path | str,
    dtype: str = "fp32",
    *,
    opset: int = OPSET,
    spec: ImageProcessorSpec | None = None,
    pad_to_square: bool | None = None,
    check_images: list[np.ndarray] | None = None,
    tolerance: dict[str, float] | None = None,
    threads: int | None = None,
) -> VisionExportInfo:
    """Export a LLaVA model's vision tower + projector to `out_path` and check it against torch.

    `source` is a LLaVA folder or model, an aligned folder (`align`) or a VILA folder. `spec` overrides the
    folder's preprocessing, `pad_to_square` (when not None) its padding to a square; `check_images` are
    (H, W, 3) uint8 photos for the check,
    on top of two random images. Raises ExportError when ONNX Runtime's output is
    outside `tolerance` (default: TOLERANCE[dtype]); nothing is left at `out_path` then.
    """
    from ...fsutil import atomic_file

    if dtype not in DTYPES:
        raise ExportError(f"unknown vision export dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    vg = vision_graph(source)
    spec = spec or vg.spec
    if pad_to_square is not None:
        spec = replace(spec, pad_to_square=pad_to_square)
    graph = vg.module
    h, w = vg.image_size
    if spec.output_size != (h, w):
        got = "images of varying size" if spec.output_size is None else f"{spec.output_size} images"
        raise ExportError(f"the preprocessing gives {got} but the vision tower takes {h}x{w}")

    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        write_dtype(lambda fp32: _torch_export(graph, fp32, (h, w), opset), tmp, dtype, vg.int8_op_types)
        pixels = _check_inputs(spec, check_images)
        check = check_against_torch(graph, tmp, pixels, threads=threads)
        within(check, tolerance or {**TOLERANCE, **vg.tolerance}[dtype], "vision encoder", dtype)
    return VisionExportInfo(
        path=out_path, family=vg.family, dtype=dtype, opset=opset, image_size=(h, w),
        n_tokens=check["n_tokens"], hidden=check["hidden"], vision_hidden=vg.vision_hidden,
        feature_layer=vg.feature_layer, select_strategy=vg.select_strategy, preprocess=spec.to_dict(), check=check,
    )


@dataclass
class VisionGraph:
    """What the export traces (pixels -> rows in the LLM's width) and what the manifest says of it."""

    module: Any
    family: str
    image_size: tuple[int, int]
    spec: ImageProcessorSpec  # the source's preprocessing (or the family's defaults)
    vision_hidden: int
    feature_layer: int | list[int]
    select_strategy: str
    tolerance: dict[str, dict[str, float]] = field(default_factory=dict)  # per dtype, over TOLERANCE
    int8_op_types: list[str] | None = None  # what int8 quantises; None: every op ONNX Runtime can


def vision_graph(source: Path | str | Any) -> VisionGraph:
    """A LLaVA folder or model, an aligned folder (`align`'s output, train/aligned_folder.py) or a VILA folder."""
    from ...sources.folders import is_vila
    from ...train.aligned_folder import is_aligned, load_aligned
    from ..vila import load_vila_vision

    if isinstance(source, (str, Path)) and is_vila(Path(source)):
        v = load_vila_vision(Path(source))
        return VisionGraph(v.module, "vila", v.image_size, v.spec, v.vision_hidden, v.select_layer, v.select_feature)

    if isinstance(source, (str, Path)) and is_aligned(Path(source)):
        aligned = load_aligned(Path(source))
        enc = aligned.encoder
        return VisionGraph(aligned.vision_graph(), f"aligned-{enc.name}", tuple(enc.image_size), aligned.spec,
                           enc.dim, enc.settings.get("feature_layer", enc.settings.get("blocks", -1)), "full",
                           dict(enc.tolerance), enc.int8_op_types)
    src = load_vision_source(source)
    family = family_for(src.config)
    return VisionGraph(family.graph(src.tower, src.projector).eval(), family.name, family.image_size,
                       src.spec or family.default_spec(), int(family.vision.hidden_size), family.layers,
                       family.strategy)


def _torch_export(graph: Any, path: Path, image_size: tuple[int, int], opset: int) -> None:
    torch = require("torch", "build")
    torch_export(graph, path, torch.zeros(2, 3, *image_size), INPUT, OUTPUT, opset)


def torch_export(graph: Any, path: Path, example: Any, input_name: str, output_name: str, opset: int) -> None:
    """One input, one output, the batch axis dynamic, every other axis as in `example`."""
    import warnings

    torch = require("torch", "build")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation notices about code we do not own
        # The TorchScript exporter: it needs no onnxscript and gives plain opset-17 graphs.
        torch.onnx.export(
            graph, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[input_name], output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            do_constant_folding=True,
        )


def write_dtype(fp32_export: Callable[[Path], None], tmp: Path, dtype: str, int8_op_types: list[str] | None) -> None:
    """`fp32_export(path)` writes the fp32 graph; `tmp` gets it in `dtype` (fp16 or int8 made from it)."""
    fp32 = tmp.with_name(tmp.name + ".fp32") if dtype != "fp32" else tmp
    try:
        fp32_export(fp32)
        if dtype == "fp16":
            _to_fp16(fp32, tmp)
        elif dtype == "int8":
            to_int8(fp32, tmp, int8_op_types)
    finally:
        if fp32 != tmp:
            fp32.unlink(missing_ok=True)


def within(check: dict[str, Any], limits: dict[str, float], what: str, dtype: str) -> None:
    """Record `limits` in `check`; ExportError when the ONNX graph is outside them."""
    check["tolerance"] = dict(limits)
    if check["max_rel_diff"] > limits["max_rel_diff"] or check["min_cosine"] < limits["min_cosine"]:
        raise ExportError(
            f"the {dtype} {what} differs from torch beyond tolerance: max rel diff "
            f"{check['max_rel_diff']:.3g} (allowed {limits['max_rel_diff']:.3g}), min cosine "
            f"{check['min_cosine']:.6f} (allowed {limits['min_cosine']})"
        )


def _to_fp16(src: Path, dst: Path) -> None:
    onnx = require("onnx", "build")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types: the graph still takes and returns float32, Casts sit at its edges
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def to_int8(src: Path, dst: Path, op_types: list[str] | None = None) -> None:
    """Dynamic quantisation: int8 weights per output channel, activations quantised per batch at
    run time (MatMulInteger); needs no calibration data. `op_types` limits which ops are quantised.

    Weights use 7 bits (reduce_range): x86 CPUs without VNNI (AVX2 only, e.g. AMD EPYC before Zen 4)
    run ONNX Runtime's u8 x s8 products with VPMADDUBSW, which saturates the int16 sum of two
    products of full-range bytes. With 8-bit weights the tiny test towers measured there 0.13
    (CLIP) and 0.50 (SigLIP) max relative difference, cosine down to 0.84; with 7 bits 0.028 and
    0.050, cosine >= 0.997, as 8 bits gave on AVX-512 VNNI hosts. 7-bit weights cannot overflow
    the pair sum, so one graph is as accurate on every CPU it may meet (ARM's SDOT and VNNI never
    saturate; they lose only the eighth bit)."""
    import logging

    require("onnxruntime", "build")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT logs a "consider pre-processing" advice on the root logger
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         **({"op_types_to_quantize": op_types} if op_types else {}))
    finally:
        root.setLevel(level)


def _check_inputs(spec: ImageProcessorSpec, photos: list[np.ndarray] | None) -> np.ndarray:
    from ...runtime.preprocess import preprocess

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((97, 131, 3), (64, 64, 3))]
    images += list(photos) if photos else [_structured_image()]
    return np.stack([preprocess(im, spec) for im in images])


def _structured_image(h: int = 240, w: int = 320) -> np.ndarray:
    """A stand-in photo (smooth gradients, edges, flat regions) when the caller gives none."""
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    r = 255 * (0.5 + 0.5 * np.sin(6 * x + 2 * y))
    g = 255 * ((x - 0.3) ** 2 + (y - 0.6) ** 2 < 0.05)
    b = 255 * np.clip(y * 1.2 - 0.1, 0, 1)
    return np.stack([r, np.maximum(g, 40 * x), b], axis=-1).astype(np.uint8)


def check_against_torch(
    graph: Any, onnx_path: Path, pixels: np.ndarray, threads: int | None = None
) -> dict[str, Any]:
    """ONNX Runtime (CPU) vs the torch module on `pixels`, as one batch and one image alone."""
    torch = require("torch", "build")
    from ...runtime.encoders import VisionEncoder

    with torch.no_grad():
        want = graph(torch.from_numpy(pixels)).float().numpy()
    encoder = VisionEncoder.load(onnx_path, providers=["CPUExecutionProvider"], threads=threads)
    try:
        got = encoder.encode(pixels)
        single = encoder.encode(pixels[:1])  # batch 1 on the same graph: the batch axis is dynamic
    finally:
        encoder.close()
    return {"images": int(pixels.shape[0]), **output_diffs(got, single, want)}


def output_diffs(got: np.ndarray, single: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    """ONNX Runtime's (batch, tokens, hidden) output, and its first item run alone, against torch's."""
    if got.shape != want.shape:
        raise ExportError(f"ONNX output shape {got.shape} differs from torch's {want.shape}")
    got = np.concatenate([got, single])
    want = np.concatenate([want, want[:1]])
    diff = np.abs(got - want)
    cos = _cosine(got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1]))
    return {
        "n_tokens": int(want.shape[1]),
        "hidden": int(want.shape[2]),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_rel_diff": float(diff.max() / max(float(np.abs(want).max()), 1e-12)),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return num / np.maximum(den, 1e-30)
