"""Prompt planners, the model families' part on the device: the manifest's `llm.prompt` names one, and it
places the encoder rows of a message's images in the tokenized prompt. The session names none.

Adding one: a module here with a planner (base.py's `PromptPlanner`), made in PLANNERS from the bundle's
`llm` section and its image encoder; the workstation family writes its name into `llm.prompt`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...errors import BundleError
from .base import IMAGE_SENTINEL, Prompt, PromptPlanner
from .sliced import SlicedPlanner
from .text import PlaceholderTextPlanner
from .token import TokenPlanner

# name -> planner, from the manifest's `llm` section and the loaded image encoder
PLANNERS: dict[str, Callable[[dict[str, Any], Any], PromptPlanner]] = {
    "token": lambda llm, encoder: TokenPlanner(_placeholder(llm).get("id")),
    "text": lambda llm, encoder: PlaceholderTextPlanner(_placeholder(llm)["text"]),
    "sliced": lambda llm, encoder: SlicedPlanner(_placeholder(llm)["text"], encoder),
}


def planner_for(llm: dict[str, Any], image_encoder: Any) -> PromptPlanner:
    """The bundle's planner (no image encoder: plain text, images refused)."""
    if image_encoder is None:
        return TokenPlanner(None)
    name = llm.get("prompt") or _older_bundle_planner(llm, image_encoder)
    if name not in PLANNERS:
        raise BundleError(f"manifest llm.prompt {name!r} is not a prompt planner this runtime has "
                          f"({', '.join(PLANNERS)}); update vishwamai-edge")
    try:
        return PLANNERS[name](llm, image_encoder)
    except KeyError as exc:
        raise BundleError(f"manifest llm.image_token has no {exc} for the {name!r} prompt planner") from None


def _older_bundle_planner(llm: dict[str, Any], image_encoder: Any) -> str:
    """Bundles built before `llm.prompt` existed: what their image token and encoder imply."""
    if getattr(image_encoder, "sliced", False):
        return "sliced"
    placeholder = _placeholder(llm)
    return "text" if placeholder.get("text") and placeholder.get("id") is None else "token"


def _placeholder(llm: dict[str, Any]) -> dict[str, Any]:
    return llm.get("image_token") or {}


__all__ = ["IMAGE_SENTINEL", "PLANNERS", "Prompt", "PromptPlanner", "planner_for"]
