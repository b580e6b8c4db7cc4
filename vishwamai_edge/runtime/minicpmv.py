"""MiniCPM-V on the device: slices -> the ONNX vision graph -> query rows -> prompt segments for the LLM.

No torch: the grid-dependent tables the graph takes (export/onnx/minicpmv.py) are made here from the
bundle's position table (runtime/minicpmv_slices.py). Pixels are the published preprocessing:
x / 255, then (x - 0.5) / 0.5 in float32 (torchvision ToTensor + Normalize with timm's
IMAGENET_INCEPTION mean = std = 0.5), per slice at its own size.

The prompt (OpenBMB's chat: the image's placeholder text, "\\n", the question) is tokenized piece by
piece between the runs of `unk` x query_num, and each run becomes one image's (or slice's) rows, in
the order overview, slices row by row: where the published code overwrites the unk tokens'
embeddings with the resampler's output. MiniCPM-V 2.0's LLM (MiniCPM) multiplies its text
embeddings by scale_emb and splices image rows unscaled, while llama.cpp scales every input row,
so 2.0's rows go in divided by scale_emb (`row_divisor`; tests/export/test_gguf.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError, InputError
from .backends import EmbeddingSegment, Segment, TokenSegment
from .encoders import INPUT, OUTPUT
from .minicpmv_slices import (
    SliceConfig,
    SlicePlan,
    navit_position_ids,
    plan_slices,
    resample_pos_embed,
    slice_pixels,
)
from .onnx_session import Provider, ort_session

TOWER_POS, KEY_POS = "tower_pos", "key_pos"  # the graph's other inputs (export/onnx/minicpmv.py)


def sincos_2d(embed_dim: int, h: int, w: int) -> np.ndarray:
    """(h*w, embed_dim) float32: MiniCPM-V's get_2d_sincos_pos_embed for an h x w grid, row-major: the first
    half of the channels encodes the column, the second the row, each [sin(p w_k), cos(p w_k)],
    w_k = 10000^(-k / (D/4))."""
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float32) / np.float32(quarter))

    def axis(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float32), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return np.concatenate([axis(cols), axis(rows)], axis=1).astype(np.float32)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> (1, 3, h, w) float32, mean = std = 0.5."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(((x - 0.5) / 0.5).transpose(2, 0, 1)[None])


@dataclass
class PositionTable:
    variant: str  # "2.0": pos_embed resampled per grid; "2.6": NaViT rows at bucketised ids
    table: np.ndarray  # (side * side, C)
    side: int

    def on_grid(self, n_h: int, n_w: int) -> np.ndarray:
        if self.variant == "2.0":
            return resample_pos_embed(self.table, self.side, n_h, n_w)
        return np.ascontiguousarray(self.table[navit_position_ids(n_h, n_w, self.side)])


class MiniCPMVEncoder:
    """The vision graph and its tables: one image -> its plan and (1 + slices) blocks of (query_num, D) rows."""

    def __init__(self, session: Any, positions: PositionTable, slices: SliceConfig, embed_dim: int):
        self.session, self.positions, self.slices, self.embed_dim = session, positions, slices, embed_dim
        names = [i.name for i in session.get_inputs()]
        if names != [INPUT, TOWER_POS, KEY_POS]:
            raise BundleError(f"the MiniCPM-V vision graph takes {names}, expected {[INPUT, TOWER_POS, KEY_POS]}")

    @classmethod
    def load(cls, graph: Path, positions: PositionTable, slices: SliceConfig, embed_dim: int,
             providers: Sequence[Provider] | None = None, threads: int | None = None) -> MiniCPMVEncoder:
        return cls(ort_session(Path(graph), providers, threads, "MiniCPM-V vision graph"), positions, slices,
                   embed_dim)

    def encode_slice(self, pixels: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8, sides multiples of the patch -> (query_num, D) float32."""
        p = self.slices.patch_size
        h, w = pixels.shape[0] // p, pixels.shape[1] // p
        feeds = {INPUT: normalize(pixels), TOWER_POS: self.positions.on_grid(h, w),
                 KEY_POS: sincos_2d(self.embed_dim, h, w)}
        return self.session.run([OUTPUT], feeds)[0][0]

    def encode(self, image: np.ndarray) -> tuple[SlicePlan, list[np.ndarray]]:
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            raise InputError(f"an image must be an (H, W, 3) uint8 RGB array, got {getattr(image, 'shape', None)}")
        plan = plan_slices(image.shape[1], image.shape[0], self.slices)
        return plan, [self.encode_slice(s) for s in slice_pixels(image, plan)]


def prompt_segments(text: str, blocks: Sequence[np.ndarray], slices: SliceConfig,
                    tokenize: Callable[[str, bool], list[int]], row_divisor: float = 1.0) -> list[Segment]:
    """`text` (placeholders already in it) split at each run of unk x query_num; the runs, in order, become
    the blocks' rows. tokenize(piece, first) must add BOS only to the first piece."""
    run = slices.unk * slices.query_num
    pieces = text.split(run)
    if len(pieces) - 1 != len(blocks):
        raise InputError(f"the prompt has {len(pieces) - 1} image placeholders for {len(blocks)} image blocks")
    segments: list[Segment] = []
    for i, piece in enumerate(pieces):
        if piece or i == 0:
            ids = tokenize(piece, i == 0)
            if ids:
                segments.append(TokenSegment(ids))
        if i < len(blocks):
            segments.append(EmbeddingSegment(np.ascontiguousarray(blocks[i] / np.float32(row_divisor),
                                                                  dtype=np.float32)))
    return segments


# the text a chat template writes for one image (MiniCPM-V's own chat() and processors write it too:
# "(<image>./</image>)"), replaced per image by its overview + slices placeholder
IMAGE_MARKER = "(<image>./</image>)"


class MiniCPMVImageEncoder:
    """A bundle's MiniCPM-V image encoder (manifest `encoders.image`, kind minicpmv): one image in,
    its placeholder text and (1 + slices) x query_num rows out. Each block of query_num rows stands
    for one run of unk tokens in the placeholder, in the same order (overview, then slices row by row)."""

    kind = "minicpmv"
    sliced = True  # rows per image vary: the session asks `placeholder` and `n_blocks` per image

    def __init__(self, encoder: MiniCPMVEncoder, row_divisor: float = 1.0):
        self.encoder = encoder
        self.slices = encoder.slices
        self.n_tokens = encoder.slices.query_num  # rows per block
        self.hidden = encoder.embed_dim
        self.row_divisor = row_divisor
        self.providers: list[str] = list(encoder.session.get_providers())

    @classmethod
    def from_manifest(cls, bundle: Any, entry: dict[str, Any], threads: int | None = None,
                      providers: Sequence[Provider] | None = None) -> MiniCPMVImageEncoder:
        """`entry` is what build.py's MiniCPM-V stage writes: graph, position table, slicing, markers."""
        try:
            s = entry["slicing"]
            slices = SliceConfig(str(s["version"]), int(s["max_slice_nums"]), int(s["scale_resolution"]),
                                 int(s["patch_size"]), int(s["query_num"]), str(entry["markers"]["unk"]),
                                 bool(s["use_image_id"]))
            table = np.load(bundle.file(entry["positions"]), allow_pickle=False)
            positions = PositionTable(str(entry["variant"]), table.astype(np.float32), int(entry["pos_side"]))
            embed_dim, divisor = int(entry["hidden"]), float(entry.get("row_divisor", 1.0))
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise BundleError(f"the manifest's MiniCPM-V image encoder entry is incomplete ({exc})") from None
        if table.shape != (positions.side ** 2, table.shape[-1]):
            raise BundleError(f"{entry['positions']}: a {table.shape} table is no {positions.side}^2 grid")
        encoder = MiniCPMVEncoder.load(bundle.file(entry["file"]), positions, slices, embed_dim,
                                       providers or entry.get("providers"), threads)
        return cls(encoder, divisor)

    def plan(self, image: np.ndarray) -> SlicePlan:
        if not (isinstance(image, np.ndarray) and image.ndim == 3):
            raise InputError(f"an image must be an (H, W, 3) uint8 RGB array, got {getattr(image, 'shape', None)}")
        return plan_slices(image.shape[1], image.shape[0], self.slices)

    def placeholder(self, image: np.ndarray, index: int) -> str:
        from .minicpmv_slices import placeholder

        return placeholder(self.plan(image), self.slices, index)

    def n_blocks(self, image: np.ndarray) -> int:
        return 1 + self.plan(image).n_slices

    def encode(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per image its (n_blocks * query_num, D) rows, already divided by `row_divisor`."""
        out = []
        for image in images:
            _, blocks = self.encoder.encode(image)
            rows = np.concatenate(blocks, axis=0) / np.float32(self.row_divisor)
            out.append(np.ascontiguousarray(rows, dtype=np.float32))
        return out

    def close(self) -> None:
        self.encoder.session = None
