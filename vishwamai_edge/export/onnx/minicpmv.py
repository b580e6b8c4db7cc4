"""MiniCPM-V's vision side (tower + resampler, export/minicpmv_vision.py) -> one ONNX graph per checkpoint.

Slices come in many sizes (export/../runtime/minicpmv_slices.py), so the graph takes any H x W (multiples
of the patch) and gets every table that depends on the patch grid as an input, computed outside: the
tower's positions (2.0: pos_embed resampled to the grid; 2.6: position_embedding rows at NaViT's
bucketised ids) and the keys' 2D sin-cos table. The graph itself is then free of grid-dependent
constants, which the TorchScript tracer would otherwise bake in for the example's size.

Graph contract:
  inputs  `pixel_values` float32 (1, 3, H, W); `tower_pos` float32 (H/P * W/P, C); `key_pos` float32
          (H/P * W/P, D)
  output  `image_embeds` float32 (1, queries, D)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ExportError, require
from ...runtime.encoders import INPUT, OUTPUT
from ...runtime.minicpmv import KEY_POS, TOWER_POS
from ..minicpmv_vision import VisionLayout
from .base import OPSET

TOLERANCE = 1e-4  # max abs, fp32 graph against torch fp32 (measured about 2e-6 on the tiny checkpoints)
# the build's check: max abs / max |torch|, as the rows of a real 26-27 layer tower are larger (random
# so400m weights at 32 x 32 patches: 1.2e-4 abs); fp32 reordering only, well below fp16's 1e-3
REL_TOLERANCE = 1e-4


def export_minicpmv_vision(module: Any, layout: VisionLayout, path: Path, opset: int = OPSET) -> Path:
    """Write the graph of `module.encode` (the caller makes `path` atomic)."""
    import warnings

    torch = require("torch", "build")

    class Encode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, pixel_values, tower_pos, key_pos):
            return self.inner.encode(pixel_values, tower_pos, key_pos)

    side = 2 * layout.patch
    example = torch.zeros(1, 3, side, side)
    tower_pos, key_pos = module.positions(2, 2)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notices about code we do not own
        torch.onnx.export(
            Encode().eval(), (example, tower_pos, key_pos), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT, TOWER_POS, KEY_POS], output_names=[OUTPUT],
            dynamic_axes={INPUT: {2: "height", 3: "width"}, TOWER_POS: {0: "patches"}, KEY_POS: {0: "patches"}},
            do_constant_folding=True,
        )
    return Path(path)


def check_minicpmv_vision(module: Any, layout: VisionLayout, path: Path, grids: list[tuple[int, int]],
                          seed: int = 0) -> float:
    """Max abs difference of ONNX Runtime against the torch reference over random slices of each (rows, cols)."""
    return compare_minicpmv_vision(module, layout, path, grids, seed)[0]


def compare_minicpmv_vision(module: Any, layout: VisionLayout, path: Path, grids: list[tuple[int, int]],
                            seed: int = 0) -> tuple[float, float]:
    """(max abs difference, max abs difference / max |torch|) of ONNX Runtime against the torch reference."""
    torch = require("torch", "build")
    ort = require("onnxruntime", "build")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst, scale = 0.0, 0.0
    for gh, gw in grids:
        pixels = rng.uniform(-1, 1, size=(1, 3, gh * layout.patch, gw * layout.patch)).astype(np.float32)
        with torch.no_grad():
            tower_pos, key_pos = module.positions(gh, gw)
            want = module(torch.from_numpy(pixels)).numpy()
        got = session.run([OUTPUT], {INPUT: pixels, TOWER_POS: tower_pos.numpy(), KEY_POS: key_pos.numpy()})[0]
        if got.shape != want.shape:
            raise ExportError(f"{path}: the graph gives {got.shape} for a {gh}x{gw} grid, torch {want.shape}")
        worst, scale = max(worst, float(np.abs(got - want).max())), max(scale, float(np.abs(want).max()))
    return worst, worst / scale if scale else worst
