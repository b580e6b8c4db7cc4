"""PyTorch `.pt` / `.bin` / `.pth` files from elsewhere: tensors only, never code.

`torch.load(weights_only=True)` unpickles tensors and plain containers and refuses every other
object, so a file that would run code when unpickled is refused before anything runs. The
refusal, and any unreadable file, becomes one line naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import SourceError, require


def load_tensors(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A state dict of tensors from a PyTorch file; anything else is a SourceError."""
    import pickle
    import zipfile

    torch = require("torch", "build")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        why = re.search(r"WeightsUnpickler error: ([^.\n]*)", str(exc))
        reason = why.group(1) if why else "it holds objects other than tensors"
        raise SourceError(f"{path} is not a tensors-only PyTorch file; it is refused, not unpickled ({reason})") from None
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"{path} cannot be read as a PyTorch tensor file ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError(f"{path} is not a state dict of tensors")
    return state
