"""MiniCPM-V slicing: plans against a table from the published rule, llama.cpp's differences, placeholders, pixels.

The expected plans are the published algorithm's values (OpenBMB MiniCPM-V 2.0 modeling_minicpmv.py
`slice_image`; MiniCPM-V 2.6 image_processing_minicpmv.py `get_sliced_grid`, `find_best_resize`,
`get_refine_size`; max_slice_nums 9, scale_resolution 448, patch 14). Worked by hand for the rows
marked (h), e.g. 1920x1080: ratio 2073600/200704 = 10.33, multiple = min(11, 9) = 9, counts 8 and 9,
log(16/9) = 0.575 is nearest log(4/2) = 0.693 -> grid 4x2; overview h = int(448/sqrt(1.778)) = 336,
w = int(336 * 1.778) = 597 -> 43 * 14 = 602; a cell of 480x540 -> h = int(448/sqrt(0.889)) = 475 ->
476, w = int(475 * 0.889) = 422 -> 420; refined 4 * 420 x 2 * 476.
"""

from __future__ import annotations

import numpy as np
import pytest

from vishwamai_edge.errors import InputError, SourceError
from vishwamai_edge.runtime.minicpmv_slices import (
    SliceConfig,
    SlicePlan,
    n_query_rows,
    placeholder,
    plan_slices,
    plan_slices_llamacpp,
    slice_pixels,
)

# (width, height) -> (overview, grid (cols, rows), refined)
PUBLISHED = {
    (448, 448): ((448, 448), None, None),  # (h) ratio 1: no slices
    (300, 200): ((546, 364), None, None),  # (h) small: scaled up, h = int(448/sqrt(1.5)) = 365 -> 364
    (500, 300): ((574, 350), None, None),  # (h) a side over 448 but area under 448^2: no slices
    (640, 480): ((518, 392), (2, 1), (728, 546)),
    (800, 600): ((518, 392), (2, 2), (1036, 784)),
    (1024, 768): ((518, 392), (2, 2), (1036, 784)),  # (h) multiple 4 -> 2x2; 387 -> 392, 516 -> 518
    (1280, 720): ((602, 336), (3, 2), (1470, 812)),
    (1920, 1080): ((602, 336), (4, 2), (1680, 952)),  # (h) see above
    (1080, 1920): ((336, 602), (2, 4), (952, 1680)),
    (4032, 3024): ((518, 392), (3, 3), (1554, 1176)),  # a 12 MP phone photo: capped at 9 slices
    (3024, 4032): ((392, 518), (3, 3), (1176, 1554)),
    (1344, 1344): ((448, 448), (3, 3), (1344, 1344)),
    (1000, 1000): ((448, 448), (2, 2), (896, 896)),
    (449, 449): ((448, 448), (1, 2), (630, 644)),  # multiple 2: 1x2 is the first of the tied grids
    (2000, 500): ((896, 224), (4, 1), (1792, 448)),
    (500, 2000): ((224, 896), (1, 4), (448, 1792)),
    (3000, 100): ((2436, 84), (3, 1), (4242, 140)),
    # (h) 399/14 = 28.5: Python's round gives 28 (-> 392), C++'s std::round 29 (-> 406)
    (460, 577): ((392, 504), (1, 2), (560, 700)),
}

# llama.cpp's mtmd plan where it differs from the published one (sizes above that are not listed agree)
LLAMACPP_DIFFERS = {
    (300, 200): ((448, 448), None, None),  # both sides <= 448: one 448 x 448 square
    (500, 300): ((504, 294), (2, 1), (812, 490)),  # a side over 448 slices; the overview is not scaled up
    (460, 577): ((406, 504), (1, 2), (560, 700)),  # half away from zero
}


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_plan_matches_published_rule(size):
    overview, grid, refined = PUBLISHED[size]
    assert plan_slices(*size, SliceConfig("2.0")) == SlicePlan(overview, grid, refined)
    assert plan_slices(*size, SliceConfig("2.6")) == SlicePlan(overview, grid, refined)  # same rule


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_llamacpp_plan(size):
    overview, grid, refined = LLAMACPP_DIFFERS.get(size, PUBLISHED[size])
    assert plan_slices_llamacpp(*size) == SlicePlan(overview, grid, refined)


def test_max_slice_nums_caps_the_grid():
    assert plan_slices(4032, 3024, SliceConfig("2.6", max_slice_nums=4)).grid == (2, 2)
    assert plan_slices(4032, 3024, SliceConfig("2.6", max_slice_nums=1)).grid is None


def test_slices_are_patch_aligned():
    config = SliceConfig("2.0")
    for w in range(300, 2400, 97):
        for h in range(300, 2400, 89):
            plan = plan_slices(w, h, config)
            assert plan.overview[0] % 14 == 0 and plan.overview[1] % 14 == 0
            if plan.grid:
                assert 2 <= plan.n_slices <= 9
                (left, top, right, bottom) = plan.boxes()[-1]
                assert (right, bottom) == plan.refined
                assert (right - left) % 14 == 0 and (bottom - top) % 14 == 0


Q = "<unk>" * 3


def test_placeholder_2_0():
    config = SliceConfig("2.0", query_num=3)
    plan = plan_slices(1280, 720, config)  # 3 x 2
    row = f"<image>{Q}</image>" * 3
    assert placeholder(plan, config) == f"<image>{Q}</image><slice>{row}\n{row}</slice>"
    assert placeholder(plan_slices(448, 448, config), config) == f"<image>{Q}</image>"
    assert n_query_rows(plan, config) == 7 * 3 == placeholder(plan, config).count("<unk>")


def test_placeholder_2_6():
    config = SliceConfig("2.6", query_num=3)
    plan = plan_slices(1280, 720, config)
    row = f"<slice>{Q}</slice>" * 3
    assert placeholder(plan, config, image_index=1) == f"<image_id>1</image_id><image>{Q}</image>{row}\n{row}"
    assert placeholder(plan_slices(448, 448, config), config) == f"<image_id>0</image_id><image>{Q}</image>"


def test_slice_pixels_overview_then_rows():
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(720, 1280, 3), dtype=np.uint8)
    plan = plan_slices(1280, 720, SliceConfig("2.6"))
    out = slice_pixels(image, plan)
    assert len(out) == 1 + 6
    assert out[0].shape == (336, 602, 3)
    want_overview = np.asarray(Image.fromarray(image).resize((602, 336), resample=Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out[0], want_overview)
    refined = np.asarray(Image.fromarray(image).resize((1470, 812), resample=Image.Resampling.BICUBIC))
    rows = [np.concatenate(out[1 + 3 * r:4 + 3 * r], axis=1) for r in range(2)]  # row by row, left to right
    np.testing.assert_array_equal(np.concatenate(rows, axis=0), refined)


def test_unknown_version():
    with pytest.raises(SourceError, match="MiniCPM-V version '2.5' is not supported; known: 2.0, 2.6"):
        SliceConfig("2.5")


def test_empty_image():
    with pytest.raises(InputError, match="empty"):
        plan_slices(0, 10, SliceConfig("2.0"))
