"""MiniCPM-V's image slicing (LLaVA-UHD style) and its placeholder text, in numpy and Pillow.

An image becomes an overview (the whole image resized, aspect kept, sides multiples of the patch
size) and, when it is larger than one slice, a grid of slices cut row by row from a second resize.
The rule, as OpenBMB publishes it (MiniCPM-V 2.0: modeling_minicpmv.py `slice_image`,
`find_best_resize`, `get_refine_size`, `split_to_patches`, `get_grid_placeholder`, the same
functions as OpenBMB/MiniCPM-V finetune/dataset.py; MiniCPM-V 2.6: image_processing_minicpmv.py
`MiniCPMVImageProcessor.get_sliced_grid` and friends, the same arithmetic):
- ratio = W*H / S^2 (S = scale_resolution, 448); multiple = min(ceil(ratio), max_slice_nums);
  multiple <= 1: no slices, the overview is scaled to about S^2 pixels, up or down;
- else the candidate slice counts are multiple-1, multiple, multiple+1 (dropping 1 and any above
  max_slice_nums); every factorisation cols x rows of each is a candidate grid, in the order
  (count, then cols ascending); the grid whose log(cols/rows) is nearest log(W/H) wins, the first
  one on a tie;
- a resize to about S^2 pixels: r = W/H, h = int(S / sqrt(r)), w = int(h * r), then each side
  rounded to the patch size: max(round(x / P) * P, P), Python's round (half to even). The overview
  is resized so only when the image has more than S^2 pixels (else it keeps its size, rounded);
- the refined image: each side first rounded to a multiple of its grid count, one cell resized as
  above (up or down), times the grid; slices are its cells, row by row.
Placeholders (Q = query_num unk tokens; `<unk>` is the tokenizer's unk text):
- 2.0: `<image>` Q `</image>` then, with a grid, `<slice>` + rows joined by "\\n" + `</slice>`, each
  row cols x (`<image>` Q `</image>`) (get_grid_placeholder without new_schema);
- 2.6: `<image_id>i</image_id>` (use_image_id) + `<image>` Q `</image>` then rows joined by "\\n",
  each row cols x (`<slice>` Q `</slice>`), no outer marks (MiniCPMVImageProcessor).

llama.cpp's mtmd (tools/mtmd, `llava_uhd::get_slice_instructions`, `get_best_resize`,
`get_best_grid`, `get_refine_size`, `ensure_divide`) keeps the same arithmetic in float32 with
C++ `std::round` (half away from zero) but decides differently when to slice: an image with a side
over S is sliced even when its area is under S^2 (multiple 1 then gives 2-slice grids), its
overview is not scaled up, and an image with both sides <= S becomes one S x S square.
`plan_slices_llamacpp` follows that so the two can be compared; the runtime uses `plan_slices`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, SourceError

# version -> (use_image_id, slices marked as <slice>...</slice> each (2.6) or the grid as a whole (2.0))
SCHEMES = {"2.0": (False, False), "2.6": (True, True)}


@dataclass(frozen=True)
class SliceConfig:
    version: str  # "2.0" or "2.6"
    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    query_num: int = 64
    unk: str = "<unk>"
    # 2.6: `<image_id>N</image_id>` before each image; the folder's config.json and
    # preprocessor_config.json both carry `use_image_id` (true as published; MiniCPMV.chat asserts
    # they agree). None: the version's scheme (2.0 never writes ids).
    use_image_id: bool | None = None

    def __post_init__(self) -> None:
        if self.version not in SCHEMES:
            raise SourceError(f"MiniCPM-V version {self.version!r} is not supported; known: {', '.join(SCHEMES)}")
        if min(self.max_slice_nums, self.scale_resolution, self.patch_size, self.query_num) < 1:
            raise SourceError(f"MiniCPM-V slicing needs positive sizes, got {self}")


@dataclass(frozen=True)
class SlicePlan:
    """Sizes are (width, height) as Pillow gives them; grid is (cols, rows)."""

    overview: tuple[int, int]
    grid: tuple[int, int] | None = None
    refined: tuple[int, int] | None = None

    @property
    def n_slices(self) -> int:
        return self.grid[0] * self.grid[1] if self.grid else 0

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of each slice in the refined image, row by row."""
        if not self.grid or not self.refined:
            return []
        (cols, rows), (w, h) = self.grid, self.refined
        cw, ch = w // cols, h // rows
        return [(c * cw, r * ch, (c + 1) * cw, (r + 1) * ch) for r in range(rows) for c in range(cols)]


# -- OpenBMB's rule ----------------------------------------------------------------------------


def _ensure_divide(length: float, patch: int) -> int:
    return max(round(length / patch) * patch, patch)  # Python's round: half to even, as published


def _best_resize(size: tuple[float, float], scale: int, patch: int, allow_upscale: bool) -> tuple[int, int]:
    width, height = size
    if width * height > scale * scale or allow_upscale:
        r = width / height
        height = int(scale / math.sqrt(r))
        width = int(height * r)
    return _ensure_divide(width, patch), _ensure_divide(height, patch)


def _best_grid(multiple: int, log_ratio: float, max_slice_nums: int) -> tuple[int, int]:
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    best, error = (1, 1), math.inf
    for n in counts:
        for cols in range(1, n + 1):
            if n % cols == 0:
                e = abs(log_ratio - math.log(cols / (n // cols)))
                if e < error:  # strict: the first grid wins a tie
                    best, error = (cols, n // cols), e
    return best


def _refine_size(size: tuple[int, int], grid: tuple[int, int], scale: int, patch: int) -> tuple[int, int]:
    cols, rows = grid
    cell = (_ensure_divide(size[0], cols) / cols, _ensure_divide(size[1], rows) / rows)
    w, h = _best_resize(cell, scale, patch, allow_upscale=True)
    return w * cols, h * rows


def plan_slices(width: int, height: int, config: SliceConfig) -> SlicePlan:
    """OpenBMB's plan for a width x height image (both versions slice alike)."""
    if width < 1 or height < 1:
        raise InputError(f"an image must not be empty, got {width}x{height}")
    s, p = config.scale_resolution, config.patch_size
    multiple = min(math.ceil(width * height / (s * s)), config.max_slice_nums)
    if multiple <= 1:
        return SlicePlan(_best_resize((width, height), s, p, allow_upscale=True))
    grid = _best_grid(multiple, math.log(width / height), config.max_slice_nums)
    return SlicePlan(_best_resize((width, height), s, p, allow_upscale=False), grid,
                     _refine_size((width, height), grid, s, p))


# -- llama.cpp's rule, for comparison ---------------------------------------------------------


def _ensure_divide_cpp(length: int, patch: int) -> int:
    q = float(np.float32(length) / np.float32(patch))
    return max(int(math.floor(abs(q) + 0.5)) * patch, patch)  # std::round: half away from zero


def _best_resize_cpp(size: tuple[int, int], scale: int, patch: int, allow_upscale: bool) -> tuple[int, int]:
    width, height = size
    if width * height > scale * scale or allow_upscale:
        r = np.float32(width) / np.float32(height)
        height = int(np.float32(scale) / np.sqrt(r))
        width = int(np.float32(height) * r)
    return _ensure_divide_cpp(width, patch), _ensure_divide_cpp(height, patch)


def plan_slices_llamacpp(width: int, height: int, slice_size: int = 448, patch: int = 14,
                         max_slice_nums: int = 9) -> SlicePlan:
    """The plan llama.cpp's mtmd makes for MiniCPM-V (2.5 / 2.6 / 4.x) images."""
    if width <= slice_size and height <= slice_size:
        return SlicePlan((slice_size, slice_size))
    ratio = np.float32(width) * np.float32(height) / np.float32(slice_size * slice_size)
    multiple = int(min(math.ceil(ratio), max_slice_nums))
    log_ratio = float(np.log(np.float32(width) / np.float32(height)))
    grid = _best_grid(multiple, log_ratio, max_slice_nums)
    cols, rows = grid
    cell = (_ensure_divide_cpp(width, cols) // cols, _ensure_divide_cpp(height, rows) // rows)
    w, h = _best_resize_cpp(cell, slice_size, patch, allow_upscale=True)
    return SlicePlan(_best_resize_cpp((width, height), slice_size, patch, allow_upscale=False), grid,
                     (w * cols, h * rows))


# -- placeholder text and pixels --------------------------------------------------------------


def placeholder(plan: SlicePlan, config: SliceConfig, image_index: int = 0) -> str:
    """The text standing for one image in the prompt; each run of `unk` gets one image's query rows."""
    use_image_id, per_slice_marks = SCHEMES[config.version]
    if config.use_image_id is not None:
        use_image_id = config.use_image_id
    queries = config.unk * config.query_num
    text = f"<image_id>{image_index}</image_id>" if use_image_id else ""
    text += f"<image>{queries}</image>"
    if not plan.grid:
        return text
    cols, rows = plan.grid
    cell = f"<slice>{queries}</slice>" if per_slice_marks else f"<image>{queries}</image>"
    grid = "\n".join(cell * cols for _ in range(rows))
    return text + (grid if per_slice_marks else f"<slice>{grid}</slice>")


def slice_pixels(image: np.ndarray, plan: SlicePlan, resample: int = 3) -> list[np.ndarray]:
    """(H, W, 3) uint8 -> the overview, then the slices row by row, each (h, w, 3) uint8.

    Pillow's BICUBIC resize of the original image for the overview and, separately, for the
    refined image (OpenBMB resizes `image` twice, never the overview again)."""
    from PIL import Image

    source = Image.fromarray(image)
    out = [np.asarray(source.resize(plan.overview, resample=resample))]
    if plan.grid and plan.refined:
        refined = source.resize(plan.refined, resample=resample)
        out.extend(np.asarray(refined.crop(box)) for box in plan.boxes())
    return out


def n_query_rows(plan: SlicePlan, config: SliceConfig) -> int:
    """How many embedding rows the image takes in the prompt (the unk tokens of its placeholder)."""
    return (1 + plan.n_slices) * config.query_num


# -- the tower's positions for a slice's patch grid --------------------------------------------


def navit_position_ids(n_h: int, n_w: int, side: int) -> np.ndarray:
    """MiniCPM-V 2.6's bucketised position ids of an n_h x n_w patch grid on a side x side table
    (modeling_navit_siglip.py: bucketize(arange(0, 1 - 1e-6, 1 / n), arange(1 / side, 1, 1 / side),
    right=True) per axis)."""
    boundaries = np.arange(1 / side, 1.0, 1 / side)

    def bucket(n: int) -> np.ndarray:
        return np.searchsorted(boundaries, np.arange(0, 1 - 1e-6, 1 / n), side="right")

    return (bucket(n_h)[:, None] * side + bucket(n_w)[None, :]).reshape(-1)


def _aa_bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's antialiased bicubic resize (align_corners False), PIL's scheme:
    a = -0.5 kernel stretched by the scale when shrinking, taps clipped to the input, rows normalised."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1 else 2.0
    inv = 1 / scale if scale >= 1 else 1.0
    a = -0.5

    def cubic(x: np.ndarray) -> np.ndarray:
        x = np.abs(x)
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return np.where(x < 1, near, np.where(x < 2, far, 0.0))

    out = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        taps = cubic((np.arange(lo, hi) - center + 0.5) * inv)
        out[i, lo:hi] = taps / taps.sum()
    return out


def resample_pos_embed(table: np.ndarray, side: int, n_h: int, n_w: int) -> np.ndarray:
    """MiniCPM-V 2.0's (side*side, C) pos_embed on an n_h x n_w grid: timm's resample_abs_pos_embed
    (F.interpolate bicubic, antialias=True), unchanged when the grid is the table's own."""
    if (n_h, n_w) == (side, side):
        return np.asarray(table, dtype=np.float32)
    grid = np.asarray(table, dtype=np.float64).reshape(side, side, -1)
    rows, cols = _aa_bicubic_weights(side, n_h), _aa_bicubic_weights(side, n_w)
    out = np.einsum("hi,ijc,wj->hwc", rows, grid, cols)
    return out.reshape(n_h * n_w, -1).astype(np.float32)
