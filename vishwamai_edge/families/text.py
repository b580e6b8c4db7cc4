"""A plain language model (Llama, Mistral, Qwen2, Gemma, Phi, MiniCPM ...): the folder is the LLM. The fallback
family: it takes any folder the others do not claim, and the GGUF converter says which architectures it carries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..stages.context import BuildContext
from .base import FamilyBuild, config_size


class TextLLM:
    name = "text"

    def detect(self, folder: Path) -> bool:
        return True

    def size(self, folder: Path, name: str) -> Any:
        return config_size(folder, name)

    def build(self, ctx: BuildContext, folder: Path) -> FamilyBuild:
        return FamilyBuild(folder)


FAMILY = TextLLM()
