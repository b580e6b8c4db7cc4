"""`text`: the image placeholder is text with no vocabulary entry (VILA's `<image>`): the prompt is tokenized
piece by piece around it and a sentinel marks each image, as VILA's own tokenizer_image_token does with
IMAGE_TOKEN_INDEX; the sentinel never reaches the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import IMAGE_SENTINEL, Tokenize, split_at


@dataclass
class PlaceholderTextPlanner:
    placeholder: str
    marker: int | None = IMAGE_SENTINEL
    name: str = "text"

    def tokens(self, text: str, images: list[np.ndarray], tokenize: Tokenize) -> list[int]:
        return split_at(text, self.placeholder, tokenize)

    def blocks(self, images: list[np.ndarray]) -> list[int]:
        return []
