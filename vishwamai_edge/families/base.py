"""What a model family is on the workstation, and what it hands back to the build."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..recipe import Recipe
from ..stages.context import BuildContext, BundlePart


@dataclass
class FamilyBuild:
    """A family's share of the build: its language model as a plain HF folder (for the GGUF export and the
    engines), the parts it adds beside the LLM, and a pre-quantized AWQ LLM the engines take as it is."""

    llm_dir: Path
    parts: list[BundlePart] = field(default_factory=list)
    awq_source: Path | None = None


@runtime_checkable
class Family(Protocol):
    """A folder layout: detected from the folder, sized for the memory plan, built into parts."""

    name: str

    def detect(self, folder: Path) -> bool: ...

    def size(self, folder: Path, name: str) -> Any: ...  # memory_plan.ModelSize

    def build(self, ctx: BuildContext, folder: Path) -> FamilyBuild: ...


@runtime_checkable
class RecipeSection(Protocol):
    """A part a recipe section asks for, whatever the LLM (speech input by transcript)."""

    name: str

    def wanted(self, recipe: Recipe) -> bool: ...

    def build(self, ctx: BuildContext) -> BundlePart: ...


def config_size(folder: Path, name: str) -> Any:
    """memory_plan's sizes from a config.json (a plain LLM, or LLaVA's text + vision config)."""
    from ..export.llava import read_config
    from ..memory_plan import model_size

    return model_size(read_config(folder), name)
