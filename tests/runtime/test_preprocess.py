"""Numpy image preprocessing against transformers 5's PIL processors.

Tolerance: max abs difference 1e-6 of the float32 pixel values (the same steps in the
same dtypes: measured 0.0, bit-identical, on every case here).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers as T
from PIL import Image

from vishwamai_edge.errors import BundleError, InputError, SourceError
from vishwamai_edge.runtime.preprocess import (
    ImageProcessorSpec,
    preprocess,
    preprocess_batch,
    rgb_array,
    spec_from_preprocessor_config,
)

TOL = 1e-6
SIZES = [(1, 1), (7, 300), (333, 517), (1024, 97), (64, 64), (31, 30)]

CLIP_336 = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
            "crop_size": {"height": 336, "width": 336}, "resample": 3}
SIGLIP_384 = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 384},
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
CONFIGS = {
    "clip-336": CLIP_336,
    # odd crop inside an odd resize: the crop offsets' rounding shows
    "clip-odd-crop": {**CLIP_336, "size": {"shortest_edge": 37}, "crop_size": {"height": 23, "width": 30}},
    # crop larger than the resized image: zero padding
    "clip-crop-pads": {**CLIP_336, "size": {"shortest_edge": 20}, "crop_size": {"height": 27, "width": 33}},
    "siglip-384": SIGLIP_384,
    "siglip-non-square": {**SIGLIP_384, "size": {"height": 40, "width": 56}, "resample": 2},
}
HF_CLASSES = {
    "CLIPImageProcessor": T.CLIPImageProcessorPil,
    "SiglipImageProcessor": T.SiglipImageProcessorPil,
    "LlavaImageProcessor": T.LlavaImageProcessorPil,
}


def hf_pixels(config: dict, image: Image.Image) -> np.ndarray:
    processor = HF_CLASSES[config["image_processor_type"]](**config)
    return processor(image, return_tensors="np")["pixel_values"][0]


def assert_parity(config: dict, image: Image.Image, pad_to_square: bool | None = None) -> float:
    want = hf_pixels(config, image)
    got = preprocess(rgb_array(image), spec_from_preprocessor_config(config, pad_to_square))
    assert got.dtype == np.float32 and got.shape == want.shape
    diff = float(np.abs(got - want).max())
    assert diff <= TOL, diff
    return diff


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("hw", SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_random_images_match_hf(name, hw):
    assert_parity(CONFIGS[name], Image.fromarray(random_image(*hw)))


@pytest.mark.parametrize("photo", ["astronaut", "coffee", "chelsea", "rocket"])
@pytest.mark.parametrize("name", ["clip-336", "siglip-384", "clip-odd-crop"])
def test_photos_match_hf(photo, name):
    from skimage import data  # scikit-image is in the dev extra: a missing one is an install error

    assert_parity(CONFIGS[name], Image.fromarray(getattr(data, photo)()))


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P"])
def test_grayscale_and_alpha_converted_like_hf(mode):
    rng = np.random.default_rng(1)
    image = Image.fromarray(random_image(45, 70))
    if mode in ("RGBA", "LA"):
        image.putalpha(Image.fromarray(rng.integers(0, 256, (45, 70), dtype=np.uint8)))
    image = image.convert(mode)
    for config in (CONFIGS["clip-odd-crop"], CONFIGS["siglip-non-square"]):
        assert_parity(config, image)


def test_photo_with_alpha_and_grayscale_photo():
    from skimage import data

    assert_parity(CLIP_336, Image.fromarray(data.logo()))  # RGBA
    assert_parity(SIGLIP_384, Image.fromarray(data.camera()))  # L


def expand2square_reference(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's rule: a square of the longer side in the background colour, the image
    pasted at offset (0, (w - h) // 2) when wider, ((h - w) // 2, 0) when taller."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


@pytest.mark.parametrize("hw", [(7, 300), (333, 517), (1024, 97), (64, 64), (30, 31)], ids=str)
def test_pad_to_square_matches_llava_rule(hw):
    config = {**CLIP_336, "size": {"shortest_edge": 36}, "crop_size": {"height": 36, "width": 36}}
    spec = spec_from_preprocessor_config(config, pad_to_square=True)
    background = tuple(int(m * 255) for m in spec.mean)
    image = Image.fromarray(random_image(*hw, seed=2))
    want = hf_pixels(config, expand2square_reference(image, background))
    got = preprocess(np.asarray(image), spec)
    assert float(np.abs(got - want).max()) <= TOL
    # transformers' own LLaVA processor with do_pad does the same
    llava = {**config, "image_processor_type": "LlavaImageProcessor", "do_pad": True}
    assert spec_from_preprocessor_config(llava).pad_to_square
    assert_parity(llava, image)


def test_reads_configs_that_transformers_writes(tmp_path):
    processors = [
        T.CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 36}),
        T.SiglipImageProcessorPil(size={"height": 48, "width": 40}, resample=2),
        T.CLIPImageProcessorPil(do_center_crop=False, do_normalize=False),
    ]
    image = Image.fromarray(random_image(50, 77, seed=3))
    for i, processor in enumerate(processors):
        processor.save_pretrained(tmp_path / str(i))
        config = json.loads((tmp_path / str(i) / "preprocessor_config.json").read_text())
        want = processor(image, return_tensors="np")["pixel_values"][0]
        got = preprocess(np.asarray(image), spec_from_preprocessor_config(config))
        assert got.shape == want.shape and float(np.abs(got - want).max()) <= TOL


def test_old_style_int_sizes():
    config = {"image_processor_type": "CLIPImageProcessor", "size": 40, "crop_size": 32}
    spec = spec_from_preprocessor_config(config)
    assert (spec.resize, spec.shortest_edge, spec.crop_size) == ("shortest_edge", 40, (32, 32))
    assert_parity(config, Image.fromarray(random_image(50, 77)))


def test_spec_defaults_follow_the_hf_classes():
    clip = spec_from_preprocessor_config({"image_processor_type": "CLIPImageProcessorFast"})
    assert (clip.kind, clip.resize, clip.shortest_edge) == ("clip", "shortest_edge", 224)
    assert clip.crop_size == (224, 224)
    siglip = spec_from_preprocessor_config({"image_processor_type": "SiglipImageProcessor"})
    assert (siglip.kind, siglip.resize, siglip.size) == ("siglip", "exact", (224, 224))
    assert siglip.crop_size is None
    assert siglip.mean == (0.5, 0.5, 0.5) and siglip.output_size == (224, 224)


def test_spec_round_trips_through_json():
    spec = spec_from_preprocessor_config(CONFIGS["clip-odd-crop"], pad_to_square=True)
    again = ImageProcessorSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    with pytest.raises(BundleError):
        ImageProcessorSpec.from_dict({**spec.to_dict(), "resize": "sideways"})
    with pytest.raises(BundleError):
        ImageProcessorSpec.from_dict({**spec.to_dict(), "colour": 1})


def test_bad_inputs_are_refused():
    spec = spec_from_preprocessor_config(CLIP_336)
    for bad in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(InputError):
            preprocess(bad, spec)
    with pytest.raises(SourceError):
        spec_from_preprocessor_config({"image_processor_type": "Idefics3ImageProcessor"})
    with pytest.raises(SourceError):
        spec_from_preprocessor_config({"image_processor_type": "CLIPImageProcessor",
                                       "size": {"longest_edge": 9}})


def test_batch():
    spec = spec_from_preprocessor_config(CONFIGS["siglip-non-square"])
    batch = preprocess_batch([random_image(10, 20), random_image(99, 7)], spec)
    assert batch.shape == (2, 3, 40, 56)
    with pytest.raises(InputError):
        preprocess_batch([random_image(10, 20), random_image(20, 10)],
                         ImageProcessorSpec(resize="shortest_edge", shortest_edge=8, crop_size=None))


def test_device_modules_import_no_training_stack():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import vishwamai_edge.runtime.preprocess, vishwamai_edge.runtime.encoders\n"
        "print(','.join(m for m in ('torch', 'transformers', 'vishwamai_edge.export') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
