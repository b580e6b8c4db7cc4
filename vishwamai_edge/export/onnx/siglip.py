"""SigLIP vision towers under a LLaVA projector (LlavaConfig with a SiglipVisionConfig).

SigLIP has no CLS token: such configs say `vision_feature_select_strategy: full`
and every patch token is kept. With "default", transformers drops the first
token anyway (a real patch); the export follows transformers, so it matches the
model as it was trained and as HF runs it.
"""

from __future__ import annotations

from ...runtime.preprocess import ImageProcessorSpec, default_spec
from .base import VisionFamily, register


@register("siglip")
class SiglipFamily(VisionFamily):
    model_types = ("siglip_vision_model",)
    has_cls = False

    def default_spec(self) -> ImageProcessorSpec:
        return default_spec("siglip", self.image_size)
