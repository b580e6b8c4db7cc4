"""`sliced`: an image is an overview and a grid of slices (MiniCPM-V), a number of blocks of rows that depends on
its size. Each image's marker text becomes its placeholder text (with its `<image>`/`<slice>` marks, from the
encoder), and the text is tokenized piece by piece between the runs of unk tokens, as OpenBMB's processor
bounds them; a sentinel stands for each run (one block of rows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import InputError
from .base import IMAGE_SENTINEL, Tokenize, split_at


@dataclass
class SlicedPlanner:
    placeholder: str
    encoder: Any  # runtime.minicpmv.MiniCPMVImageEncoder: placeholder text and blocks per image
    marker: int | None = IMAGE_SENTINEL
    name: str = "sliced"

    def tokens(self, text: str, images: list[np.ndarray], tokenize: Tokenize) -> list[int]:
        first, *rest = text.split(self.placeholder)
        if len(rest) != len(images):
            raise InputError(f"the chat template placed {len(rest)} image markers for {len(images)} images")
        text = first + "".join(self.encoder.placeholder(im, i) + chunk
                               for i, (im, chunk) in enumerate(zip(images, rest)))
        return split_at(text, self.encoder.slices.unk * self.encoder.slices.query_num, tokenize)

    def blocks(self, images: list[np.ndarray]) -> list[int]:
        return [self.encoder.n_blocks(im) for im in images]
