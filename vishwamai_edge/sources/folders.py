"""HF folders as sources: checked for what the stages read, and VILA's layout recognised."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SourceError

VILA_ARCHITECTURES = ("LlavaLlamaModel",)


VILA_MODEL_TYPES = ("llava_llama",)


def is_vila(folder: Path) -> bool:
    """A VILA folder (config.json with llm_cfg / vision_tower_cfg / mm_projector_cfg; export/vila.py)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and (
        any(a in VILA_ARCHITECTURES for a in config.get("architectures") or []) or config.get("model_type") in VILA_MODEL_TYPES)


def check_hf_dir(path: Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise SourceError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
    if is_vila(path):  # weights in llm/, vision_tower/, mm_projector/: export/vila.py checks each
        return path
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise SourceError(f"model folder {path} has no weights (*.safetensors)")
    return path
