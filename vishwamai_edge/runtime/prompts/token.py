"""`token`: the chat template writes one vocabulary token per image (LLaVA's `<image>`, an aligned model's);
the prompt is tokenized in one call and the encoder's rows replace each such token."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Tokenize


@dataclass
class TokenPlanner:
    marker: int | None
    name: str = "token"

    def tokens(self, text: str, images: list[np.ndarray], tokenize: Tokenize) -> list[int]:
        return tokenize(text, True)

    def blocks(self, images: list[np.ndarray]) -> list[int]:
        return []
