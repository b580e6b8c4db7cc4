"""The trained bridge from an encoder's feature grid to rows in the LLM's embedding space.

    features (batch, grid_h * grid_w, dim)
      -> average pooling to k x k cells (k = sqrt(tokens)), LLaVA-style token reduction
      -> Linear(dim, hidden) [-> GELU -> Linear(hidden, hidden) ...] -> Linear(.., llm_width)

With depth 2 and no pooling this is LLaVA-1.5's `mlp2x_gelu`. Pooling is a fixed
(tokens x cells) averaging matrix, adaptive pooling's bins (cell i covers
floor(i*n/k) .. ceil((i+1)*n/k)), so it exports to ONNX as one MatMul for any grid.
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


def make_projector(dim: int, width: int, grid: tuple[int, int], tokens: int, depth: int = 2,
                   hidden: int | None = None) -> Any:
    """A new projector (its weights from torch's current random state)."""
    torch = require("torch", "train")
    hidden = hidden or width

    class Projector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens, self.grid, self.depth = tokens, tuple(grid), depth
            self.in_dim, self.out_dim, self.hidden = dim, width, hidden
            pool = None if tokens == grid[0] * grid[1] else pooling_matrix(grid, tokens)
            self.register_buffer("pool", pool, persistent=False)
            widths = [dim] + [hidden] * (depth - 1) + [width]
            self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

        def forward(self, features):
            x = features if self.pool is None else torch.matmul(self.pool, features)
            for i, layer in enumerate(self.layers):
                x = layer(torch.nn.functional.gelu(x) if i else x)
            return x

        def describe(self) -> dict[str, Any]:
            return {"depth": self.depth, "tokens": self.tokens, "grid": list(self.grid), "in_dim": self.in_dim,
                    "hidden": self.hidden, "out_dim": self.out_dim, "activation": "gelu"}

    return Projector()
