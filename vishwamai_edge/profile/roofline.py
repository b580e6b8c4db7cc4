"""Roofline ratio: how close decoding comes to the memory-bandwidth limit.

Decoding one token reads (about) every weight once plus the KV cache so far, so

    ratio = decode tokens/s x bytes read per token / peak memory bandwidth

and 1.0 is the ceiling. Bytes per token are approximated as the GGUF file size (all
weights, including the token-embedding table of which only one row is really read) plus
the f16 KV cache at the mean context of the decode: 2 x n_layer x n_ctx x n_kv_heads x
head_dim x 2 bytes. The bandwidth is the target profile's published peak, not a measured one.
"""

from __future__ import annotations

from .gguf_meta import ModelShape

APPROXIMATION = (
    "roofline ratio = decode tokens/s x bytes read per token / peak bandwidth; bytes per token = GGUF file "
    "size (all weights, the embedding table counted whole) + f16 KV cache at the mean decode context "
    "(2 x n_layer x n_ctx x n_kv_heads x head_dim x 2 bytes); bandwidth = the target profile's published peak"
)


def bytes_per_token(shape: ModelShape, context: float) -> float:
    return shape.file_bytes + context * shape.kv_bytes_per_position()


def roofline_ratio(decode_tps: float, shape: ModelShape, context: float, bandwidth_gbs: float) -> float:
    return decode_tps * bytes_per_token(shape, context) / (bandwidth_gbs * 1e9)
