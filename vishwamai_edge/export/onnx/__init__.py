"""Encoders -> ONNX graphs for ONNX Runtime on the device, one small module per family."""

from __future__ import annotations

from . import clip, siglip  # noqa: F401  (registers the families)
from .base import (
    DTYPES,
    OPSET,
    TOLERANCE,
    VisionExportInfo,
    VisionFamily,
    export_vision,
    family_for,
    load_vision_source,
    register,
    supported_families,
)

__all__ = [
    "DTYPES", "OPSET", "TOLERANCE", "VisionExportInfo", "VisionFamily", "export_vision", "family_for",
    "load_vision_source", "register", "supported_families",
]
