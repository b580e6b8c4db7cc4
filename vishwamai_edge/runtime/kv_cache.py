"""KV-cache element types: f16 (llama.cpp's default), q8_0 and q4_0.

A quantized cache stores every K and V row in ggml blocks of 32 elements: q8_0 as an f16
scale and 32 int8 values (34 bytes), q4_0 as an f16 scale and 32 4-bit values (18 bytes)
(ggml/src/ggml-common.h: block_q8_0, block_q4_0). llama.cpp keeps a quantized V only with
flash attention (src/llama-context.cpp refuses the context otherwise), so the backend turns
flash attention on for those types; f16 leaves llama.cpp's own choice.

The type is a bundle setting (recipe `runtime.kv_type`, recorded in the manifest's `runtime`
section like `n_ctx`) that `--kv-type` overrides at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

DEFAULT_KV_TYPE = "f16"


@dataclass(frozen=True)
class KVType:
    name: str
    ggml_type: int  # enum ggml_type in ggml/include/ggml.h
    block_elems: int
    block_bytes: int

    @property
    def quantized(self) -> bool:
        return self.block_elems > 1

    @property
    def bytes_per_element(self) -> float:
        return self.block_bytes / self.block_elems

    def row_bytes(self, n_elems: int) -> int:
        """Bytes of one cached row of `n_elems` values (a whole number of blocks)."""
        if n_elems % self.block_elems:
            raise InputError(f"a {self.name} KV cache needs rows of a multiple of {self.block_elems} values, "
                             f"this model's are {n_elems}")
        return n_elems // self.block_elems * self.block_bytes


KV_TYPES: dict[str, KVType] = {
    t.name: t
    for t in [
        KVType("f16", 1, 1, 2),
        KVType("q8_0", 8, 32, 34),
        KVType("q4_0", 2, 32, 18),
    ]
}


def kv_type(name: str | None) -> KVType:
    """The KV type called `name` (None: the default), or a one-line error naming the known ones."""
    key = DEFAULT_KV_TYPE if name is None else str(name).strip().lower()
    if key not in KV_TYPES:
        raise InputError(f"unknown KV-cache type {name!r}; this build supports {', '.join(KV_TYPES)}")
    return KV_TYPES[key]


def kv_cache_bytes(n_layer: int, n_ctx: int, n_embd_k: int, n_embd_v: int, kv: KVType) -> int:
    """The cache llama.cpp allocates: per layer and position one K row of n_head_kv x head_dim_k
    values and one V row of n_head_kv x head_dim_v, each of `kv`'s type."""
    return n_layer * n_ctx * (kv.row_bytes(n_embd_k) + kv.row_bytes(n_embd_v))
