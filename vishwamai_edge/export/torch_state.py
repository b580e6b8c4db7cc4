"""Torch state dicts read from a folder's safetensors and loaded strictly: one place for our references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SourceError


def safetensors_state(folder: Path, what: str) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SourceError(f"{folder}: no *.safetensors weights ({what})")
    state: dict[str, Any] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (OSError, SafetensorError) as exc:
            raise SourceError(f"{f} cannot be read as safetensors ({exc})") from None
    return state


def load_exact(module: Any, state: dict[str, Any], where: Path, what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SourceError(f"{where}: the {what}'s tensors do not match its config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
