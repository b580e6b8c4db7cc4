"""The trained bridge from an encoder's feature grid to rows in the LLM's embedding space.

    features (batch, grid_h * grid_w, dim)
      -> average pooling to k x k cells (k = sqrt(tokens)), LLaVA-style token reduction
      -> Linear(dim, hidden) [-> GELU -> Linear(hidden, hidden) ...] -> Linear(.., llm_width)

With depth 2 and no pooling this is LLaVA-1.5's `mlp2x_gelu`. Pooling is a fixed
(tokens x cells) averaging matrix, adaptive pooling's bins (cell i covers
floor(i*n/k) .. ceil((i+1)*n/k)), so it exports to ONNX as one MatMul for any grid.

Audio encoders give a long sequence of frames (Whisper: 1500 for 30 s) instead of a grid; there
the rows are cut down by stacking: `stack` consecutive frames are concatenated into one vector
(the sequence zero-padded at its end to a multiple of `stack`), then the same MLP. This is
Ultravox's `StackAudioFrames` (fixie-ai/ultravox, ultravox/model/ultravox_model.py: stack_factor 8,
zero padding to a multiple) and LLaMA-Omni's `EncoderProjectorConcat` (ictnlp/LLaMA-Omni,
omni_speech/model/speech_projector/speech_projector.py: k = speech_encoder_ds_rate, 5 in its
paper, the frames left over dropped, then Linear, ReLU, Linear); padding as Ultravox, GELU as
for images here.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import require


def pooling_matrix(grid: tuple[int, int], tokens: int) -> Any:
    torch = require("torch", "train")
    k = math.isqrt(tokens)
    gh, gw = grid

    def bins(n: int) -> list[tuple[int, int]]:
        return [(i * n // k, -(-(i + 1) * n // k)) for i in range(k)]

    m = torch.zeros(tokens, gh * gw)
    for a, (y0, y1) in enumerate(bins(gh)):
        for b, (x0, x1) in enumerate(bins(gw)):
            cells = [y * gw + x for y in range(y0, y1) for x in range(x0, x1)]
            m[a * k + b, cells] = 1.0 / len(cells)
    return m


def stacked_tokens(frames: int, stack: int) -> int:
    """Rows an audio projector gives for `frames` encoder frames stacked `stack` at a time."""
    return -(-frames // stack)


def make_projector(dim: int, width: int, grid: tuple[int, int], tokens: int, depth: int = 2,
                   hidden: int | None = None, stack: int = 1) -> Any:
    """A new projector (its weights from torch's current random state). `stack` > 1: an audio
    projector over `grid[0] * grid[1]` frames, `tokens` must be their stacked count."""
    torch = require("torch", "train")
    hidden = hidden or width
    cells = grid[0] * grid[1]
    if stack > 1 and tokens != stacked_tokens(cells, stack):
        raise ValueError(f"{cells} frames stacked {stack} at a time give {stacked_tokens(cells, stack)} rows, "
                         f"not {tokens}")

    class Projector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens, self.grid, self.depth, self.stack = tokens, tuple(grid), depth, stack
            self.in_dim, self.out_dim, self.hidden = dim, width, hidden
            pool = None if stack > 1 or tokens == cells else pooling_matrix(grid, tokens)
            self.register_buffer("pool", pool, persistent=False)
            self.pad = tokens * stack - cells  # zero frames after the last one (stacking)
            widths = [dim * stack] + [hidden] * (depth - 1) + [width]
            self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

        def forward(self, features):
            x = features if self.pool is None else torch.matmul(self.pool, features)
            if self.stack > 1:
                x = torch.nn.functional.pad(x, (0, 0, 0, self.pad)) if self.pad else x
                x = x.reshape(x.shape[0], self.tokens, self.stack * self.in_dim)
            for i, layer in enumerate(self.layers):
                x = layer(torch.nn.functional.gelu(x) if i else x)
            return x

        def describe(self) -> dict[str, Any]:
            out = {"depth": self.depth, "tokens": self.tokens, "grid": list(self.grid), "in_dim": self.in_dim,
                   "hidden": self.hidden, "out_dim": self.out_dim, "activation": "gelu"}
            return {**out, "stack": self.stack} if self.stack > 1 else out

    return Projector()
