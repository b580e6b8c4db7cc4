"""A vision-language model made here (`finetune.method: align`): the pretrained image encoder and the trained
projector -> ONNX checked against torch, the LLM (with its `<image>` token) as any other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..stages.context import BuildContext
from ..stages.vision import stage_vision, vision_part
from ..train.aligned_folder import is_aligned, read_info
from .base import FamilyBuild, config_size


class AlignedVision:
    name = "aligned-vision"

    def detect(self, folder: Path) -> bool:
        return is_aligned(folder) and read_info(folder)["encoder"].get("modality") != "audio"

    def size(self, folder: Path, name: str) -> Any:
        return config_size(folder / "llm", name)

    def build(self, ctx: BuildContext, folder: Path) -> FamilyBuild:
        from ..export.llava import chat_template

        encoder, entry = stage_vision(ctx, folder)
        part = vision_part(ctx, encoder, entry, read_info(folder)["image_token"], chat_template(folder / "llm"), None)
        return FamilyBuild(folder / "llm", [part])


FAMILY = AlignedVision()
