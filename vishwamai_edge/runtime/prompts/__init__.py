"""Prompt planners, the model families' part on the device: the manifest's `llm.prompt` names one, and it
places the encoder rows of a message's images in the tokenized prompt. The session names none.

Adding one: a module here with a planner (base.py's `PromptPlanner`), made in PLANNERS from the bundle's
`llm` section and its image encoder; the workstation family writes its name into `llm.prompt`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...errors import BundleError
from ..manifest import LLMSection, Placeholder
from .base import IMAGE_SENTINEL, Prompt, PromptPlanner
from .sliced import SlicedPlanner
from .text import PlaceholderTextPlanner
from .token import TokenPlanner

# name -> planner, from the manifest's `llm` section and the loaded image encoder
PLANNERS: dict[str, Callable[[LLMSection, Any], PromptPlanner]] = {
    "token": lambda llm, encoder: TokenPlanner(_placeholder(llm).id),
    "text": lambda llm, encoder: PlaceholderTextPlanner(_placeholder_text(llm)),
    "sliced": lambda llm, encoder: SlicedPlanner(_placeholder_text(llm), encoder),
}


def planner_for(llm: LLMSection, image_encoder: Any) -> PromptPlanner:
    """The bundle's planner (no image encoder: plain text, images refused)."""
    if image_encoder is None:
        return TokenPlanner(None)
    if llm.prompt not in PLANNERS:
        raise BundleError(f"manifest llm.prompt {llm.prompt!r} is not a prompt planner this runtime has "
                          f"({', '.join(PLANNERS)}); update vishwamai-edge")
    return PLANNERS[llm.prompt](llm, image_encoder)


def _placeholder(llm: LLMSection) -> Placeholder:
    return llm.image_token or Placeholder()


def _placeholder_text(llm: LLMSection) -> str:
    if not _placeholder(llm).text:
        raise BundleError(f"manifest llm.image_token has no text for the {llm.prompt!r} prompt planner")
    return str(_placeholder(llm).text)


__all__ = ["IMAGE_SENTINEL", "PLANNERS", "Prompt", "PromptPlanner", "planner_for"]
