"""How a bundle runs on this device: built once by the CLI from its flags and handed to chat, serve, ui and
profile. A field left None takes the bundle's own default (manifest `runtime`: the recipe's settings and
the target's slots and draft length)."""

from __future__ import annotations

from dataclasses import dataclass

from .speculative import SpeculativeOptions


@dataclass(frozen=True)
class RuntimeOptions:
    n_ctx: int | None = None  # context tokens, shared evenly by the slots (None: the bundle's, each)
    n_threads: int | None = None  # CPU threads (None: the backend's choice)
    parallel: int | None = 1  # sequences decoded together (None: the bundle's target's default)
    speculative: SpeculativeOptions | None = None  # None: the bundle's runtime.speculative, else off
    kv_type: str | None = None  # f16 | q8_0 | q4_0 (None: the bundle's runtime.kv_type)
    verify: bool = True  # hash every bundle file against the manifest before loading
