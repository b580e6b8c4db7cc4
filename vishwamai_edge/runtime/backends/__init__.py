"""LLM backends: one module each, implementing the small `LLMBackend` protocol.

A prompt reaches a backend as segments: runs of token ids, and runs of embedding
rows (an image or audio encoder's output, already projected to the LLM's width).
Adding a backend is one module plus one line in `BACKENDS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union, runtime_checkable

import numpy as np

from ...errors import InputError, UserError

MIN_CTX = 64  # smaller contexts are refused: llama.cpp aborts the process on some, and nothing useful fits


class Cancelled(Exception):
    """A prefill stopped because its caller asked (the stop button, a client that left)."""


@dataclass(frozen=True)
class TokenSegment:
    tokens: Sequence[int]

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class EmbeddingSegment:
    embeddings: np.ndarray  # (n, n_embd) float32

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])


Segment = Union[TokenSegment, EmbeddingSegment]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    # Penalties on tokens among the last `penalty_last_n` of the sequence (prompt and reply), as
    # llama.cpp applies them: repeat divides a positive logit (multiplies a negative one);
    # frequency subtracts count x value, presence subtracts the value once (OpenAI's semantics).
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be 0 (greedy) or more"),
            (self.top_k >= 0, "top_k must be 0 (off) or more"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be positive (1 = off)"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (self.penalty_last_n >= 0, "penalty_last_n must be 0 or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    @property
    def has_penalties(self) -> bool:
        return self.penalty_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
        )


@dataclass(frozen=True)
class MemoryUse:
    model_bytes: int  # weights as loaded
    context_bytes: int  # KV cache and compute buffers as far as the backend can tell
    process_rss_bytes: int
    kv_cache_bytes: int | None = None  # K and V as the runtime reports allocating them


class LLMBackend(Protocol):
    """What the session needs from an LLM runtime."""

    n_ctx: int
    n_embd: int
    n_vocab: int

    def prefill(self, segments: Sequence[Segment], abort: Callable[[], bool] | None = None) -> None:
        """Evaluate a prompt, replacing the current sequence (a shared token prefix may be kept).

        `abort` is polled while evaluating; when it returns True the prefill stops and raises
        `Cancelled`, leaving only the shared prefix evaluated."""

    def stream(self, sampling: SamplingParams, max_tokens: int) -> Iterator[int]:
        """Sample and yield tokens one at a time, stopping at an end-of-generation token."""

    def reset(self) -> None:
        """Forget the evaluated sequence (empty the KV cache): the next prefill starts from scratch."""

    def logits(self) -> np.ndarray:
        """Logits of the last evaluated position, (n_vocab,) float32."""

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]: ...

    def token_bytes(self, token: int, special: bool = False) -> bytes: ...

    def special_texts(self) -> frozenset[str]:
        """The text of every token that `tokenize(..., parse_special=True)` turns into a control token."""

    def is_eog(self, token: int) -> bool: ...

    def special_token(self, kind: str) -> tuple[int, str] | None:
        """The ("bos" | "eos") token's id and text, or None if the model has none."""

    def chat_template(self) -> str | None:
        """The chat template the model file carries, if any."""

    def memory(self) -> MemoryUse: ...

    def close(self) -> None: ...


@runtime_checkable
class SupportsAdapters(Protocol):
    """Run-time LoRA adapters, switched per request."""

    def load_adapter(self, name: str, path: Path) -> None: ...

    def use_adapter(self, name: str | None, scale: float = 1.0) -> None: ...


@runtime_checkable
class SupportsSlots(Protocol):
    """Several sequences in one context, decoded together (runtime/slots.py)."""

    n_seq: int


@runtime_checkable
class SupportsRollback(Protocol):
    """The KV cache cut back to a length: speculative decoding drops rejected drafts."""

    def rollback(self, keep: int, seq: int = 0) -> None: ...


@runtime_checkable
class SupportsScoring(Protocol):
    """Logits at the positions from `start` on of a token window, from an empty cache (`eval`)."""

    def score(self, tokens: Sequence[int], start: int = 0) -> np.ndarray: ...

    def adds_bos(self) -> bool: ...


@runtime_checkable
class SupportsGrammar(Protocol):
    """Constrained replies: `sample` masks the logits with a grammar's state (runtime/constrained.py)."""

    vocab_pointer: Any


class BackendClass(Protocol):
    """A backend's class: `check` refuses, before anything loads, run-time options it cannot honour."""

    batched: bool  # whether it runs several slots (else one request at a time)

    def check(self, parallel: int, kv_type: str | None, speculative: bool) -> None: ...

    def load(self, path: Any, **options: Any) -> LLMBackend: ...


BACKENDS: dict[str, str] = {
    "llamacpp": "vishwamai_edge.runtime.backends.llamacpp:LlamaCppBackend",
    "trtllm": "vishwamai_edge.runtime.backends.trtllm:TrtLlmBackend",
}


def backend_class(name: str) -> BackendClass:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    module_name, cls_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)
