"""A prompt as the LLM takes it, and what a prompt planner is: the part of a model family on the device that
turns the rendered conversation into tokens, with a marker where each block of encoder rows goes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ..backends import EmbeddingSegment, Segment, TokenSegment

IMAGE_SENTINEL = -200  # where an image goes in a prompt tokenized around a text placeholder (VILA's value)
Tokenize = Callable[[str, bool], list[int]]  # (text, add BOS) -> tokens, control tokens parsed


@runtime_checkable
class PromptPlanner(Protocol):
    """One way of placing images in a prompt (manifest `llm.prompt`)."""

    name: str
    marker: int | None  # the token that stands for one block of image rows (None: the bundle takes no images)

    def tokens(self, text: str, images: list[np.ndarray], tokenize: Tokenize) -> list[int]: ...

    def blocks(self, images: list[np.ndarray]) -> list[int]: ...  # blocks of rows per image; [] for one each


def split_at(text: str, separator: str, tokenize: Tokenize) -> list[int]:
    """`text` tokenized piece by piece around `separator`, each occurrence becoming IMAGE_SENTINEL."""
    first, *rest = text.split(separator)
    tokens = tokenize(first, True)
    for chunk in rest:
        tokens += [IMAGE_SENTINEL] + (tokenize(chunk, False) if chunk else [])
    return tokens


@dataclass
class Prompt:
    """A rendered, tokenized conversation: one placeholder token per image (and per audio clip,
    embeddings mode), each kind in its order."""

    tokens: list[int]
    images: list[np.ndarray]
    image_positions: list[int]  # one per block of rows: an image with slices (MiniCPM-V) has several
    tokens_per_image: int = 0  # rows per block
    blocks_per_image: list[int] = field(default_factory=list)  # empty: one block each
    audio: list[tuple[np.ndarray, int]] = field(default_factory=list)  # (samples, rate)
    audio_positions: list[int] = field(default_factory=list)
    tokens_per_audio: int = 0

    @property
    def size(self) -> int:
        """Context positions it takes: each placeholder becomes the encoder's rows."""
        return (len(self.tokens) + len(self.image_positions) * (self.tokens_per_image - 1)
                + len(self.audio) * (self.tokens_per_audio - 1))

    def segments(self, embeddings: list[np.ndarray], audio_embeddings: list[np.ndarray] | tuple = ()) -> list[Segment]:
        out: list[Segment] = []
        start = 0
        if self.blocks_per_image:  # each image's rows, one block per position
            n = self.tokens_per_image
            embeddings = [rows[i * n:(i + 1) * n] for rows, k in zip(embeddings, self.blocks_per_image)
                          for i in range(k)]
        placed = sorted([*zip(self.image_positions, embeddings), *zip(self.audio_positions, audio_embeddings)],
                        key=lambda item: item[0])
        for pos, rows in placed:
            if pos > start:
                out.append(TokenSegment(self.tokens[start:pos]))
            out.append(EmbeddingSegment(rows))
            start = pos + 1
        if start < len(self.tokens):
            out.append(TokenSegment(self.tokens[start:]))
        return out
