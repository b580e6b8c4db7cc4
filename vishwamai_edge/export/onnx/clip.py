"""CLIP vision towers as LLaVA-1.5 uses them (llava-hf layout).

Features come from `hidden_states[vision_feature_layer]` (LLaVA-1.5: -2, the
penultimate layer, before any post-layernorm); "default" drops the CLS token
(576 tokens at 336 px / patch 14), "full" keeps it (577).
"""

from __future__ import annotations

from ...runtime.preprocess import ImageProcessorSpec, default_spec
from .base import VisionFamily, register


@register("clip")
class CLIPFamily(VisionFamily):
    model_types = ("clip_vision_model",)
    has_cls = True

    def default_spec(self) -> ImageProcessorSpec:
        return default_spec("clip", self.image_size)
