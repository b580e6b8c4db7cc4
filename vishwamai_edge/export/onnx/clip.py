"""CLIP vision towers as LLaVA-1.5 uses them (llava-hf layout).

Features come from `hidden_states[vision_feature_layer]` (LLaVA-1.5: -2, the
penultimate layer, before any post-layernorm); "default" drops the CLS token
(576 tokens at 336 px / patch 14), "full" keeps it (577).
"""

from __future__ import annotations

from ...runtime.preprocess import CLIP_MEAN, CLIP_STD, ImageProcessorSpec
from .base import VisionFamily, register


@register("clip")
class CLIPFamily(VisionFamily):
    model_types = ("clip_vision_model",)
    has_cls = True

    def default_spec(self) -> ImageProcessorSpec:
        # CLIPImageProcessor's defaults at the tower's size: shortest edge, then centre crop
        h, w = self.image_size
        return ImageProcessorSpec(kind="clip", resize="shortest_edge", shortest_edge=min(h, w),
                                  crop_size=(h, w), mean=CLIP_MEAN, std=CLIP_STD)
