"""Model families on the workstation, one module each: a family detects its folder layout, sizes the model
for the memory plan and builds its parts (encoders, the LLM as a plain HF folder, manifest entries).
`build.py` asks `family_for(folder)` and names no family.

Adding one: a module here with a `FAMILY` (families/base.py's `Family`), listed in FAMILIES before
`text`, the fallback; a recipe section that adds a part to any LLM is a `SECTION` in SECTIONS.
"""

from __future__ import annotations

from pathlib import Path

from . import aligned, audio_embeddings, llava, minicpmv, text, text_embeddings, vila, whisper
from .base import Family, FamilyBuild, RecipeSection

# the first whose `detect` says yes; text takes the rest
FAMILIES: tuple[Family, ...] = (audio_embeddings.FAMILY, aligned.FAMILY, llava.FAMILY, minicpmv.FAMILY,
                                vila.FAMILY, text.FAMILY)
SECTIONS: tuple[RecipeSection, ...] = (whisper.SECTION, text_embeddings.SECTION)


def family_for(folder: Path) -> Family:
    return next(f for f in FAMILIES if f.detect(folder))


__all__ = ["FAMILIES", "SECTIONS", "Family", "FamilyBuild", "RecipeSection", "family_for"]
