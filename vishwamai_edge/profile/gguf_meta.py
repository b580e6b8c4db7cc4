"""The model shape a roofline needs, read from a GGUF header in pure Python.

The device runtime has neither gguf-py nor torch, and the backend hides its model
handle, so the few header fields (layers, KV heads, head size) are read here directly:
key/value pairs only, arrays skipped, tensor data never touched.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import BundleError

# GGUF value types -> struct format (fixed-size scalars)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError("GGUF header ends early")
    return struct.unpack(fmt, data)[0]


def _read_string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    return f.read(n).decode("utf-8", "replace")


def _read_value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])
    if vtype == _STRING:
        return _read_string(f)
    if vtype == _ARRAY:
        item_type = _read(f, "<I")
        count = _read(f, "<Q")
        if item_type in _SCALARS:  # skip without reading: vocabularies are large
            f.seek(count * struct.calcsize(_SCALARS[item_type]), 1)
        else:
            for _ in range(count):
                _read_value(f, item_type)
        return {"array_of": item_type, "length": count}
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_kv(path: Path | str) -> dict[str, Any]:
    """Every key/value pair of a GGUF header; arrays become {"array_of", "length"}."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise BundleError(f"{path} is not a GGUF file (bad magic)")
            version = _read(f, "<I")
            if version < 2:
                raise BundleError(f"{path} is GGUF version {version}; only versions 2 and later are read")
            _read(f, "<Q")  # tensor count
            n_kv = _read(f, "<Q")
            out: dict[str, Any] = {}
            for _ in range(n_kv):
                key = _read_string(f)
                out[key] = _read_value(f, _read(f, "<I"))
            return out
    except (EOFError, ValueError, OSError) as exc:
        raise BundleError(f"cannot read the GGUF header of {path}: {exc}") from None


@dataclass(frozen=True)
class ModelShape:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int | None
    file_bytes: int

    def kv_bytes_per_position(self, bytes_per_element: int = 2) -> int:
        """K and V of one token position in every layer, f16 by default (llama.cpp's KV type)."""
        return self.n_layer * self.n_head_kv * (self.head_dim_k + self.head_dim_v) * bytes_per_element

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_shape(path: Path | str) -> ModelShape:
    kv = read_gguf_kv(path)
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise BundleError(f"{path} has no general.architecture in its GGUF header")

    def get(name: str, default: Any = None) -> Any:
        value = kv.get(f"{arch}.{name}", default)
        if isinstance(value, dict):  # per-layer arrays (some hybrid models): not handled here
            return default
        return value

    n_embd = int(get("embedding_length", 0))
    n_head = int(get("attention.head_count", 0))
    n_layer = int(get("block_count", 0))
    if not (n_embd and n_head and n_layer):
        raise BundleError(
            f"{path}: the GGUF header lacks {arch}.embedding_length, attention.head_count or block_count"
        )
    n_head_kv = int(get("attention.head_count_kv", n_head))
    head_dim = n_embd // n_head
    ctx = get("context_length")
    return ModelShape(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=int(get("attention.key_length", head_dim)),
        head_dim_v=int(get("attention.value_length", head_dim)),
        n_ctx_train=int(ctx) if ctx is not None else None,
        file_bytes=Path(path).stat().st_size,
    )
