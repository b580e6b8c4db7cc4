"""Encoders -> ONNX graphs for ONNX Runtime on the device: vision towers with their projector (`base`),
aligned audio encoders (`audio`), Whisper (`whisper`), MiniCPM-V's tower and resampler (`minicpmv`)."""

from __future__ import annotations

from .base import DTYPES, OPSET, TOLERANCE, LlavaVision, VisionExportInfo, export_vision, family_for, load_vision_source

__all__ = ["DTYPES", "OPSET", "TOLERANCE", "LlavaVision", "VisionExportInfo", "export_vision", "family_for",
           "load_vision_source"]
