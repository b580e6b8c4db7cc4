"""The manifest's `encoders` section -> loaded encoders, one entry per kind of encoder the runtime has.

An entry names its kind (`encoders.image.kind`: vision, minicpmv; `encoders.audio.kind`: audio-embeddings,
speech-to-text); a schema-1 manifest, which left some kinds implicit, gets them in `manifest.migrate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import BundleError
from .bundle import Bundle


def _vision(bundle: Bundle, entry: dict[str, Any], threads: int | None) -> Any:
    from .encoders import ImageEncoder

    return ImageEncoder.from_manifest(bundle.file(entry["file"]), entry, threads=threads)


def _minicpmv(bundle: Bundle, entry: dict[str, Any], threads: int | None) -> Any:
    from .minicpmv import MiniCPMVImageEncoder

    return MiniCPMVImageEncoder.from_manifest(bundle, entry, threads=threads)


def _audio_embeddings(bundle: Bundle, entry: dict[str, Any], threads: int | None) -> Any:
    from .encoders import AudioEmbeddingEncoder

    return AudioEmbeddingEncoder.from_manifest(bundle.file(entry.get("file", "")), entry, threads=threads)


def _speech(bundle: Bundle, entry: dict[str, Any], threads: int | None) -> Any:
    from .encoders import SpeechEncoder

    return SpeechEncoder.from_bundle(bundle, entry, threads=threads)


def _sentence_embedding(bundle: Bundle, entry: dict[str, Any], threads: int | None) -> Any:
    from .embeddings import LazyEmbedder

    return LazyEmbedder(bundle, entry, threads)  # loaded on first use: a chat that never asks costs no memory


# (slot, kind) -> loader: the slot says what a chat part it takes, the kind how it is run
ENCODERS: dict[tuple[str, str], Callable[[Bundle, dict[str, Any], int | None], Any]] = {
    ("image", "vision"): _vision,
    ("image", "minicpmv"): _minicpmv,
    ("audio", "audio-embeddings"): _audio_embeddings,
    ("audio", "speech-to-text"): _speech,
    ("embedding", "sentence-embedding"): _sentence_embedding,  # not a chat part: /v1/embeddings, documents
}


def load_encoders(bundle: Bundle, n_threads: int | None = None) -> dict[str, Any]:
    """The manifest's `encoders` section: slot (image, audio) -> a loaded encoder (ONNX Runtime sessions)."""
    out: dict[str, Any] = {}
    try:
        for slot, entry in bundle.manifest.encoders.items():
            loader = ENCODERS.get((slot, entry.kind))
            if loader is None:
                raise BundleError(f"bundle {bundle.root}: manifest encoders.{slot} ({entry.kind}) is not an encoder "
                                  "this runtime has")
            out[slot] = loader(bundle, entry.model_dump(mode="json"), n_threads)
    except BaseException:
        for encoder in out.values():
            encoder.close()
        raise
    return out
