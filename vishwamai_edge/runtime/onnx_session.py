"""ONNX Runtime sessions for the bundle's graphs (encoders, Whisper, MiniCPM-V's vision side)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import BundleError, require

# TensorRT is left out of the default on purpose: its first session builds an engine,
# minutes on a Jetson; ask for it by name when the bundle's target wants it.
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
Provider = str | tuple[str, dict[str, Any]]  # a name, or (name, provider options)


def choose_providers(preferred: Sequence[Provider] | None, available: Sequence[str]) -> list[Provider]:
    """The preferred providers this onnxruntime build has, in the preferred order."""
    wanted = list(preferred) if preferred is not None else list(DEFAULT_PROVIDERS)
    chosen = [p for p in wanted if (p if isinstance(p, str) else p[0]) in available]
    if not chosen:
        names = [p if isinstance(p, str) else p[0] for p in wanted]
        raise BundleError(
            f"none of the execution providers {', '.join(names)} is in this onnxruntime "
            f"(it has {', '.join(available)})"
        )
    return chosen


def ort_session(path: Path, providers: Sequence[Provider] | None, threads: int | None, what: str) -> Any:
    """An ONNX Runtime session on the preferred providers this build has; one-line errors."""
    ort = require("onnxruntime", "runtime")
    if not path.is_file():
        raise BundleError(f"{what} {path} does not exist")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    chosen = choose_providers(providers, ort.get_available_providers())
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as exc:  # ORT raises its own exception types for a bad or truncated file
        raise BundleError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}") from exc
