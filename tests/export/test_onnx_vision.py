"""Vision tower + projector -> ONNX, on tiny random LLaVA models (CLIP and SigLIP towers):
ONNX Runtime against transformers' own `get_image_features`, batch 1 and 3.

Tolerances, against torch fp32, relative to max |ref| (random init makes the outputs
small, about 0.04-0.06, so a bare absolute number would say little):
  fp32  1e-4 relative and 1e-5 absolute   (measured about 4e-7 relative)
  fp16  1e-2 relative, cosine >= 0.999    (measured 5e-4 to 9e-4 relative, cosine 0.999999)
  int8  0.1 relative, cosine >= 0.99      (dynamic int8, per-channel weights: measured
                                           2e-2 to 5e-2 relative, cosine >= 0.998)
"""

from __future__ import annotations

import collections
import sys

import numpy as np
import onnx
import pytest
import torch
import transformers as T
from PIL import Image
from safetensors.torch import load_file, save_file
from vision_models import LLM_HIDDEN, build_tiny_llava_vision

from vishwamai_edge.errors import BundleError, ExportError, InputError, MissingDependencyError
from vishwamai_edge.export.onnx import TOLERANCE, export_vision
from vishwamai_edge.train.encoders import hf_tower_types
from vishwamai_edge.runtime.encoders import VisionEncoder
from vishwamai_edge.runtime.onnx_session import choose_providers
from vishwamai_edge.runtime.preprocess import ImageProcessorSpec, preprocess, rgb_array

VARIANTS = {
    # name: (builder arguments, tokens per image)
    "clip": ({"tower": "clip", "vision_feature_layer": -2, "select_strategy": "default"}, 25),
    "clip-full-layer1": ({"tower": "clip", "vision_feature_layer": 1, "select_strategy": "full"}, 26),
    "clip-two-layers": ({"tower": "clip", "vision_feature_layer": [-3, -1], "select_strategy": "default"},
                        25),
    "siglip": ({"tower": "siglip", "image_size": 32, "patch_size": 8, "num_layers": 2,
                "vision_feature_layer": -1, "select_strategy": "full"}, 16),
}
CHECK = {  # (max abs diff relative to max |ref|, min cosine) asserted here
    "fp32": (1e-4, 0.99999),
    "fp16": (1e-2, 0.999),
    "int8": (0.1, 0.99),
}
THREADS = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    built = {}

    def make(name: str):
        if name not in built:
            built[name] = build_tiny_llava_vision(tmp_path_factory.mktemp(name), **VARIANTS[name][0])
        return built[name]

    return make


@pytest.fixture(scope="module")
def hf_model():
    loaded = {}

    def load(folder):
        if folder not in loaded:
            model = T.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
            loaded[folder] = model.eval()
        return loaded[folder]

    return load


def hf_features(model, pixel_values: np.ndarray) -> np.ndarray:
    """transformers' projected image features: `get_image_features(...).pooler_output`, one per image."""
    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.from_numpy(pixel_values))
    return torch.stack(list(out.pooler_output)).numpy()


def random_pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def photo(name: str = "astronaut") -> np.ndarray:
    from skimage import data  # the dev extra's scikit-image

    return getattr(data, name)()


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_onnx_matches_get_image_features(model_dir, hf_model, tmp_path, variant, dtype):
    folder = model_dir(variant)
    info = export_vision(folder, tmp_path / "vision.onnx", dtype, check_images=[photo()], threads=THREADS)
    size = VARIANTS[variant][0].get("image_size", 30)
    assert (info.n_tokens, info.hidden, info.image_size) == (VARIANTS[variant][1], LLM_HIDDEN, (size, size))
    assert info.check["max_rel_diff"] <= TOLERANCE[dtype]["max_rel_diff"]
    encoder = VisionEncoder.load(info.path, threads=THREADS)
    assert encoder.providers == ["CPUExecutionProvider"]
    rel, min_cos = CHECK[dtype]
    for batch in (1, 3):
        x = random_pixels(batch, size, seed=batch)
        got, want = encoder.encode(x), hf_features(hf_model(folder), x)
        assert got.shape == want.shape == (batch, info.n_tokens, LLM_HIDDEN) and got.dtype == np.float32
        diff = float(np.abs(got - want).max())
        if dtype == "fp32":
            assert diff <= 1e-5, diff
        assert diff <= rel * float(np.abs(want).max()), diff
        cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
        assert cos.min() >= min_cos, cos.min()


@pytest.mark.parametrize("variant", ["clip", "siglip"])
def test_raw_image_through_numpy_preprocess_and_onnx_matches_hf(model_dir, hf_model, tmp_path, variant):
    """Photo -> our numpy preprocessing -> ONNX Runtime  vs  the folder's HF processor -> torch."""
    folder = model_dir(variant)
    info = export_vision(folder, tmp_path / "vision.onnx", "fp32", threads=THREADS)
    encoder = VisionEncoder.load(info.path, threads=THREADS)
    processor = T.AutoImageProcessor.from_pretrained(folder)
    spec = ImageProcessorSpec.from_dict(info.preprocess)  # as the device reads it from the manifest
    images = [Image.fromarray(photo("coffee")), Image.fromarray(photo("logo")),  # RGBA
              Image.fromarray(np.random.default_rng(5).integers(0, 256, (7, 300, 3), dtype=np.uint8))]
    for image in images:
        ours = preprocess(rgb_array(image), spec)[None]
        theirs = processor(image, return_tensors="np")["pixel_values"]
        assert float(np.abs(ours - theirs).max()) <= 1e-6
        diff = np.abs(encoder.encode(ours) - hf_features(hf_model(folder), theirs)).max()
        assert diff <= 1e-5, diff


def test_graph_contract(model_dir, tmp_path):
    folder = model_dir("clip")
    graphs = {dt: export_vision(folder, tmp_path / f"{dt}.onnx", dt, threads=THREADS) for dt in TOLERANCE}
    for dtype, info in graphs.items():
        model = onnx.load(str(info.path))
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
        (inp,), (out,) = model.graph.input, model.graph.output
        assert inp.name == "pixel_values" and out.name == "image_embeds"
        assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
        assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, 30, 30]
        ops = collections.Counter(n.op_type for n in model.graph.node)
        types = {t.data_type for t in model.graph.initializer if len(t.dims) >= 2}
        if dtype == "fp32":
            # feature layer -2 of 3: the last layer is dead code and gone (8 MatMuls a layer, 2 projector)
            assert ops["MatMul"] == 2 * 8 + 2
            assert types == {onnx.TensorProto.FLOAT}
        elif dtype == "fp16":
            assert types == {onnx.TensorProto.FLOAT16}
        else:
            assert ops["MatMulInteger"] > 0 and onnx.TensorProto.INT8 in types
        assert set(info.check) >= {"max_abs_diff", "max_rel_diff", "min_cosine", "mean_cosine", "tolerance"}
    manifest = graphs["fp16"].to_dict()
    assert manifest["file"] == "fp16.onnx" and manifest["io_dtype"] == "float32" and manifest["opset"] == 17
    assert manifest["preprocess"]["kind"] == "clip" and manifest["n_tokens"] == 25
    assert manifest["feature_layer"] == -2 and manifest["select_strategy"] == "default"
    sizes = {dt: info.path.stat().st_size for dt, info in graphs.items()}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]


def test_hub_layout_checkpoint(model_dir, tmp_path):
    """llava-hf hub checkpoints name tensors `vision_tower.vision_model.*`, `language_model.model.*`."""
    folder = model_dir("clip")
    hub = tmp_path / "hub"
    hub.mkdir()
    for f in ("config.json", "preprocessor_config.json"):
        (hub / f).write_bytes((folder / f).read_bytes())
    renamed = {}
    for key, tensor in load_file(str(folder / "model.safetensors")).items():
        key = key.removeprefix("model.")
        key = key.replace("vision_tower.", "vision_tower.vision_model.", 1)
        key = key.replace("language_model.", "language_model.model.", 1)
        renamed[key] = tensor.half()  # hub checkpoints are fp16
    save_file(renamed, str(hub / "model-00001-of-00001.safetensors"))
    a = VisionEncoder.load(export_vision(folder, tmp_path / "a.onnx", threads=THREADS).path, threads=THREADS)
    b = VisionEncoder.load(export_vision(hub, tmp_path / "b.onnx", threads=THREADS).path, threads=THREADS)
    x = random_pixels(2, 30)
    assert float(np.abs(a.encode(x) - b.encode(x)).max()) < 2e-3  # the fp16 rounding of the weights only


def test_export_from_a_loaded_model_leaves_it_unchanged(model_dir, tmp_path):
    folder = model_dir("siglip")
    model = T.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float16)
    info = export_vision(model, tmp_path / "v.onnx", threads=THREADS)
    assert next(model.parameters()).dtype == torch.float16
    assert info.n_tokens == 16
    assert info.preprocess["kind"] == "siglip" and info.preprocess["resize"] == "exact"


def test_out_of_tolerance_is_refused_and_leaves_nothing(model_dir, tmp_path):
    out = tmp_path / "out" / "vision.onnx"
    with pytest.raises(ExportError, match="beyond tolerance"):
        export_vision(model_dir("clip"), out, "int8", tolerance={"max_rel_diff": 1e-9, "min_cosine": 1.0},
                      threads=THREADS)
    assert list(out.parent.iterdir()) == []


def test_unsupported_inputs(model_dir, tmp_path, tiny_model):
    # the one encoder registry's HF towers: what LLaVA folders and align both take
    assert hf_tower_types() == ["clip", "clip_vision_model", "siglip", "siglip_vision_model"]
    with pytest.raises(ExportError, match="dtype"):
        export_vision(model_dir("clip"), tmp_path / "v.onnx", "bf16")
    with pytest.raises(ExportError, match="not LLaVA"):
        export_vision(tiny_model("llama"), tmp_path / "v.onnx")
    with pytest.raises(ExportError, match="config.json"):
        export_vision(tmp_path, tmp_path / "v.onnx")
    with pytest.raises(ExportError, match="takes 30x30"):
        export_vision(model_dir("clip"), tmp_path / "v.onnx",
                      spec=ImageProcessorSpec(shortest_edge=32, crop_size=(32, 32)))


def test_spec_override_travels_in_the_info(model_dir, tmp_path):
    """LLaVA-1.5's pad-to-square is not in llava-hf's processor config: the recipe adds it."""
    folder = model_dir("clip")
    spec = ImageProcessorSpec(shortest_edge=30, crop_size=(30, 30), pad_to_square=True)
    info = export_vision(folder, tmp_path / "v.onnx", spec=spec, check_images=[photo("chelsea")],
                         threads=THREADS)
    assert ImageProcessorSpec.from_dict(info.preprocess) == spec


def test_provider_choice():
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    pref = ["TensorrtExecutionProvider", ("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert choose_providers(pref, available) == pref[1:]
    assert choose_providers(None, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(BundleError, match="TensorrtExecutionProvider"):
        choose_providers(["TensorrtExecutionProvider"], ["CPUExecutionProvider"])


def test_encoder_refuses_bad_files_and_inputs(model_dir, tmp_path, monkeypatch):
    with pytest.raises(BundleError, match="does not exist"):
        VisionEncoder.load(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(BundleError, match="cannot load"):
        VisionEncoder.load(tmp_path / "junk.onnx")
    encoder = VisionEncoder.load(export_vision(model_dir("clip"), tmp_path / "v.onnx", threads=THREADS).path)
    assert (encoder.image_size, encoder.n_tokens, encoder.hidden) == ((30, 30), 25, LLM_HIDDEN)
    with pytest.raises(InputError, match="30x30"):
        encoder.encode(random_pixels(1, 32))
    with pytest.raises(InputError):
        encoder.encode(random_pixels(1, 30)[0])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"vishwamai-edge\[runtime\]"):
        VisionEncoder.load(tmp_path / "v.onnx")
