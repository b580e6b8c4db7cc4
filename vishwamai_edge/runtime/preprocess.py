"""Image preprocessing for vision encoders, in numpy and Pillow (no torch, no transformers).

Parity target: transformers 5's PIL processors, `CLIPImageProcessorPil`,
`SiglipImageProcessorPil` and `LlavaImageProcessorPil` (what transformers uses when
torchvision is absent). What they do, read from transformers 5.24's
`image_processing_backends.PilBackend` and `image_transforms`, and mirrored here:
- resizing is Pillow's `Image.resize` on the uint8 image (no float round trip);
- shortest-edge resizing truncates the long side: `int(size * long / short)`;
- centre crop starts at `(H - h) // 2`, `(W - w) // 2`; a crop larger than the
  image pads with zeros, the image placed at `ceil((h - H) / 2)`;
- rescaling multiplies in float64 and casts to float32; normalising subtracts and
  divides in float32;
- LLaVA's pad-to-square (`image_aspect_ratio: pad`, LLaVA's `expand2square`) pads the
  uint8 image, before anything else, with `int(m * 255)` of each channel's mean,
  the image centred at `(side - h) // 2` (or `(side - w) // 2`).
Following the same steps in the same dtypes gives bit-identical pixel values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import BundleError, InputError, SourceError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
BICUBIC = 3  # Pillow's Image.Resampling.BICUBIC, the code HF configs store as "resample"
RESIZE_MODES = ("shortest_edge", "exact", "none")
KINDS = ("clip", "siglip")


@dataclass(frozen=True)
class ImageProcessorSpec:
    """How one encoder wants its pixels; travels in a bundle manifest as `to_dict()`."""

    kind: str = "clip"  # which HF processor this mirrors: "clip" | "siglip"
    resize: str = "shortest_edge"  # "shortest_edge" | "exact" | "none"
    shortest_edge: int | None = 224  # resize == "shortest_edge"
    size: tuple[int, int] | None = None  # (h, w) when resize == "exact"
    crop_size: tuple[int, int] | None = (224, 224)  # (h, w) centre crop; None: no crop
    resample: int = BICUBIC  # a Pillow resampling code
    rescale_factor: float | None = 1 / 255  # None: no rescaling
    normalize: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = False  # LLaVA-1.5's `image_aspect_ratio: pad`

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, not {self.resize!r}")
        if self.resize == "shortest_edge" and not (self.shortest_edge and self.shortest_edge > 0):
            raise ValueError("resize 'shortest_edge' needs a positive shortest_edge")
        if self.resize == "exact" and not (self.size and min(self.size) > 0):
            raise ValueError("resize 'exact' needs a positive size (h, w)")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per RGB channel")

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(h, w) of every output, or None when it depends on the input image."""
        if self.crop_size:
            return self.crop_size
        return self.size if self.resize == "exact" else None

    @property
    def pad_color(self) -> tuple[int, int, int]:
        r, g, b = (int(m * 255) for m in self.mean)
        return r, g, b

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageProcessorSpec:
        try:
            fields = dict(data)
            for key in ("size", "crop_size", "mean", "std"):
                if fields.get(key) is not None:
                    fields[key] = tuple(fields[key])
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"the image preprocessing spec {data!r} is invalid: {exc}") from None


# -- reading HF preprocessor_config.json ---------------------------------------------------

# Class defaults of the HF processors, used for keys a preprocessor_config.json leaves out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
             "do_center_crop": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
    "siglip": {"size": {"height": 224, "width": 224}, "crop_size": None,
               "do_center_crop": False, "image_mean": HALF, "image_std": HALF},
}
_TYPES = {"CLIPImageProcessor": "clip", "LlavaImageProcessor": "clip", "SiglipImageProcessor": "siglip"}


def default_spec(kind: str, size: tuple[int, int]) -> ImageProcessorSpec:
    """The HF processor's defaults at an encoder's input size, for folders without a
    preprocessor_config.json. clip: shortest edge, then centre crop; siglip: one resize to the
    exact size, no crop, mean = std = 0.5."""
    h, w = size
    if kind == "clip":
        return ImageProcessorSpec(kind="clip", resize="shortest_edge", shortest_edge=min(h, w),
                                  crop_size=(h, w), mean=CLIP_MEAN, std=CLIP_STD)
    return ImageProcessorSpec(kind="siglip", resize="exact", shortest_edge=None, size=(h, w),
                              crop_size=None, mean=HALF, std=HALF)


def spec_from_preprocessor_config(
    config: dict[str, Any], pad_to_square: bool | None = None
) -> ImageProcessorSpec:
    """An HF `preprocessor_config.json` (CLIP, LLaVA or SigLIP image processor) as a spec.

    `pad_to_square` overrides the config: llava-hf folders do not say it, the original
    LLaVA-1.5 release says it in the model's config (`image_aspect_ratio: pad`).
    """
    raw_type = str(config.get("image_processor_type", ""))
    base_type = raw_type.removesuffix("Fast").removesuffix("Pil")
    if base_type not in _TYPES:
        raise SourceError(
            f"image processor {raw_type or '(none given)'} is not supported; "
            f"supported: {', '.join(sorted(_TYPES))}"
        )
    kind = _TYPES[base_type]
    c = {**_DEFAULTS[kind], **{k: v for k, v in config.items() if v is not None}}
    # Both HF classes set default_to_square False: an int size is a shortest edge.
    square = bool(config.get("default_to_square", False))

    resize, shortest, size = "none", None, None
    if c.get("do_resize", True):
        size_dict = _size_dict(c["size"], square, "size")
        if set(size_dict) == {"shortest_edge"}:
            resize, shortest = "shortest_edge", int(size_dict["shortest_edge"])
        elif set(size_dict) == {"height", "width"}:
            resize, size = "exact", (int(size_dict["height"]), int(size_dict["width"]))
        else:
            raise SourceError(
                f"image processor size {c['size']!r} is not supported (shortest_edge or height/width)"
            )
    crop = None
    if c.get("do_center_crop") and c.get("crop_size") is not None:
        crop_dict = _size_dict(c["crop_size"], True, "crop_size")
        crop = (int(crop_dict["height"]), int(crop_dict["width"]))

    if pad_to_square is None:
        # do_pad means pad-to-square only for LLaVA's processor (elsewhere: pad a batch to one size)
        pad_to_square = base_type == "LlavaImageProcessor" and bool(c.get("do_pad", False))
    return ImageProcessorSpec(
        kind=kind,
        resize=resize,
        shortest_edge=shortest,
        size=size,
        crop_size=crop,
        resample=int(c.get("resample", BICUBIC)),
        rescale_factor=float(c.get("rescale_factor", 1 / 255)) if c.get("do_rescale", True) else None,
        normalize=bool(c.get("do_normalize", True)),
        mean=_per_channel(c["image_mean"]),
        std=_per_channel(c["image_std"]),
        pad_to_square=bool(pad_to_square),
    )


def _size_dict(value: Any, default_to_square: bool, name: str) -> dict[str, int]:
    """HF's old size spellings (int, [h, w]) as the dict the processors use."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    raise SourceError(f"image processor {name} {value!r} is not understood")


def _per_channel(value: Any) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    r, g, b = (float(v) for v in value)
    return r, g, b


# -- the pipeline ----------------------------------------------------------------------------


def rgb_array(image: Any) -> np.ndarray:
    """A Pillow image as (H, W, 3) uint8; transparency is composited onto white, as HF does."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB"))


def preprocess(pixels: np.ndarray, spec: ImageProcessorSpec) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, h, w) float32 pixel values for the encoder."""
    ok = isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 3
    if not ok or pixels.shape[2] != 3:
        shape = getattr(pixels, "shape", None)
        dtype = getattr(pixels, "dtype", type(pixels).__name__)
        raise InputError(f"an image must be an (H, W, 3) uint8 RGB array, got {dtype} of shape {shape}")
    if min(pixels.shape[:2]) == 0:
        raise InputError(f"an image must not be empty, got shape {pixels.shape}")
    image = pixels
    if spec.pad_to_square:
        image = expand_to_square(image, spec.pad_color)
    if spec.resize != "none":
        image = _resize(image, _target_size(image.shape[0], image.shape[1], spec), spec.resample)
    if spec.crop_size:
        image = center_crop(image, spec.crop_size)
    if spec.rescale_factor is not None:
        out = (image.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    else:
        out = image.astype(np.float32)
    if spec.normalize:
        out = (out - np.array(spec.mean, dtype=np.float32)) / np.array(spec.std, dtype=np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def preprocess_batch(images: list[np.ndarray], spec: ImageProcessorSpec) -> np.ndarray:
    """Several images as one (n, 3, h, w) batch (their outputs must share a size)."""
    out = [preprocess(im, spec) for im in images]
    if len({o.shape for o in out}) > 1:
        raise InputError("images preprocess to different sizes; encode them one at a time")
    return np.stack(out)


def expand_to_square(image: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    h, w = image.shape[:2]
    if h == w:
        return image
    side = max(h, w)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[:] = np.array(color, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = image
    return out


def _target_size(h: int, w: int, spec: ImageProcessorSpec) -> tuple[int, int]:
    if spec.resize == "exact":
        assert spec.size is not None
        return spec.size
    s = int(spec.shortest_edge or 0)
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(s * long / short)  # truncation, as HF (and torchvision) do
    return (new_long, s) if w <= h else (s, new_long)


def _resize(image: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    from PIL import Image

    h, w = size
    return np.asarray(Image.fromarray(image).resize((w, h), resample=resample))


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crop (H, W, C) to (h, w) around the centre; zero-pad an axis the crop is larger than."""
    for axis, want in enumerate(size):
        have = image.shape[axis]
        if want <= have:
            start = (have - want) // 2
            index = [slice(None)] * image.ndim
            index[axis] = slice(start, start + want)
            image = image[tuple(index)]
        else:
            before = math.ceil((want - have) / 2)
            pad = [(0, 0)] * image.ndim
            pad[axis] = (before, want - have - before)
            image = np.pad(image, pad)
    return image
