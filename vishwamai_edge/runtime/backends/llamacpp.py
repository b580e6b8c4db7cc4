"""llama.cpp backend, on llama-cpp-python's low-level C API.

The high-level `Llama` class cannot take embedding rows, which multimodal
prompts need, so this drives `llama_decode` directly: token segments and
embedding segments go into batches, sampling uses llama.cpp's sampler chain.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ...errors import BundleError, ContextOverflowError, InputError, require
from . import MIN_CTX, Cancelled, EmbeddingSegment, MemoryUse, SamplingParams, Segment, TokenSegment

_EMBEDDING_KEY = -1  # positions filled from embeddings never match a cached prefix
_DECODE_ABORTED = 2  # llama_decode's return code when the abort callback said stop

_log_state: dict = {"callback": None, "errors": [], "last_level": 0}


def _llama():
    return require("llama_cpp", "runtime")


def _quiet_logs(llama_cpp) -> None:
    """Route llama.cpp's chatter away from the terminal; keep errors for our messages."""
    if _log_state["callback"] is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):  # noqa: ARG001
        # ggml levels: 2 info, 3 warn, 4 error, 5 continuation of the previous message
        if level == 4 or (level == 5 and _log_state["last_level"] == 4):
            line = text.decode("utf-8", "replace").strip()
            if line:
                _log_state["errors"] = (_log_state["errors"] + [line])[-5:]
        if level != 5:
            _log_state["last_level"] = level

    _log_state["callback"] = callback  # keep a reference: C holds only the pointer
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()


def default_threads() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


class LlamaCppBackend:
    def __init__(self, lib, model, ctx, path: Path, n_batch: int):
        self._lib = lib
        self._model = model
        self._ctx = ctx
        self.path = path
        self._vocab = lib.llama_model_get_vocab(model)
        self.n_ctx: int = lib.llama_n_ctx(ctx)
        self.n_embd: int = lib.llama_model_n_embd(model)
        self.n_vocab: int = lib.llama_vocab_n_tokens(self._vocab)
        self.n_batch = n_batch
        self._token_batch = lib.llama_batch_init(n_batch, 0, 1)
        self._evaluated: list[int] = []  # token id per KV position (_EMBEDDING_KEY for embeddings)
        self._abort: Callable[[], bool] | None = None
        self._adapters: dict[str, object] = {}  # name -> llama_adapter_lora pointer
        self._active_adapter: tuple[str, float] | None = None

        # Polled by ggml between graph nodes while a batch is evaluated: a long prefill stops
        # within milliseconds of a cancel. Installed once; it asks nothing unless a prefill is running.
        @lib.ggml_abort_callback
        def abort_callback(_data) -> bool:
            check = self._abort
            return bool(check is not None and check())

        self._abort_callback = abort_callback  # C holds only the pointer
        lib.llama_set_abort_callback(ctx, abort_callback, None)

    @classmethod
    def load(
        cls,
        path: Path | str,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_gpu_layers: int | None = None,
    ) -> LlamaCppBackend:
        lib = _llama()
        _quiet_logs(lib)
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"model file {path} does not exist")
        if n_ctx < MIN_CTX:
            raise InputError(f"the context length must be at least {MIN_CTX} tokens, got {n_ctx}")
        if n_threads is not None and n_threads < 1:
            raise InputError(f"the thread count must be at least 1, got {n_threads}")
        n_batch = min(n_batch, n_ctx)
        mparams = lib.llama_model_default_params()
        if n_gpu_layers is None:  # a CUDA/Metal build offloads every layer; a CPU build ignores it
            n_gpu_layers = -1 if lib.llama_supports_gpu_offload() else 0
        mparams.n_gpu_layers = n_gpu_layers
        _log_state["errors"] = []
        model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            detail = _log_state["errors"][0] if _log_state["errors"] else "unknown error"  # the cause
            raise BundleError(f"llama.cpp cannot load {path}: {detail} (truncated or not a GGUF model?)")
        threads = n_threads or default_threads()
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            lib.llama_model_free(model)
            raise BundleError(f"llama.cpp cannot create a context of {n_ctx} tokens for {path} (out of memory?)")
        return cls(lib, model, ctx, path, n_batch)

    # -- tokens ------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self._lib.llama_token * cap)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (self._lib.llama_token * cap)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)  # per call: safe from any thread, and cheap
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def special_token(self, kind: str) -> tuple[int, str] | None:
        getter = {"bos": self._lib.llama_vocab_bos, "eos": self._lib.llama_vocab_eos}[kind]
        tok = getter(self._vocab)
        if tok < 0:
            return None
        return tok, self.token_bytes(tok, special=True).decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        tmpl = self._lib.llama_model_chat_template(self._model, None)
        return tmpl.decode("utf-8") if tmpl else None

    # -- evaluation --------------------------------------------------------------------
    def prefill(self, segments: Sequence[Segment], abort: Callable[[], bool] | None = None) -> None:
        keys: list[int] = []
        for seg in segments:
            keys.extend(seg.tokens if isinstance(seg, TokenSegment) else [_EMBEDDING_KEY] * len(seg))
        if not keys:
            raise ContextOverflowError("the prompt is empty")
        if len(keys) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(keys)} tokens but the context holds {self.n_ctx}; "
                "shorten it or load the bundle with a larger context"
            )
        keep = self._common_prefix(keys)
        keep = min(keep, len(keys) - 1)  # re-evaluate at least the last position for fresh logits
        self._truncate(keep)
        pos = 0
        self._abort = abort
        try:
            for seg in segments:
                n = len(seg)
                lo = max(0, keep - pos)
                if lo < n:
                    last = pos + n == len(keys)
                    if isinstance(seg, TokenSegment):
                        self._decode_tokens(list(seg.tokens)[lo:], pos + lo, last)
                    else:
                        self._decode_embeddings(seg.embeddings[lo:], pos + lo, last)
                pos += n
        except Cancelled:
            self._truncate(keep)  # batches evaluated before the abort stay in memory: drop them
            raise
        finally:
            self._abort = None
        self._evaluated = keys

    def _common_prefix(self, keys: list[int]) -> int:
        n = 0
        for a, b in zip(self._evaluated, keys):
            if a != b or a == _EMBEDDING_KEY:
                break
            n += 1
        return n

    def reset(self) -> None:
        self._truncate(0)

    # -- LoRA adapters -----------------------------------------------------------------
    def load_adapter(self, name: str, path: Path | str) -> None:
        """Load a LoRA GGUF for this model (it stays off until `use_adapter`)."""
        path = Path(path)
        _log_state["errors"] = []
        adapter = self._lib.llama_adapter_lora_init(self._model, str(path).encode())
        if not adapter:  # a NULL pointer object, not None
            detail = _log_state["errors"][0] if _log_state["errors"] else "unknown error"
            raise BundleError(f"llama.cpp cannot load the adapter {path}: {detail}")
        self._adapters[name] = adapter

    def use_adapter(self, name: str | None, scale: float = 1.0) -> None:
        """Apply adapter `name` (None: the base alone) at `scale` from the next prefill on. A change
        empties the KV cache: positions computed under another adapter are never reused."""
        want = None if name is None else (name, float(scale))
        if want == self._active_adapter:
            return
        if name is not None and name not in self._adapters:
            raise InputError(f"no adapter {name!r} is loaded; loaded: {', '.join(sorted(self._adapters)) or 'none'}")
        if name is None:
            self._lib.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            adapters = (self._lib.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
            scales = (ctypes.c_float * 1)(scale)
            self._lib.llama_set_adapters_lora(self._ctx, adapters, 1, scales)
        self._active_adapter = want
        self.reset()

    @property
    def adapter(self) -> str | None:
        return self._active_adapter[0] if self._active_adapter else None

    def _truncate(self, keep: int) -> None:
        mem = self._lib.llama_get_memory(self._ctx)
        if keep == 0:
            self._lib.llama_memory_clear(mem, True)
        else:
            self._lib.llama_memory_seq_rm(mem, 0, keep, -1)
        del self._evaluated[keep:]

    def _decode_tokens(self, tokens: list[int], start: int, want_last_logits: bool) -> None:
        batch = self._token_batch
        for off in range(0, len(tokens), self.n_batch):
            chunk = tokens[off : off + self.n_batch]
            batch.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = start + off + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 0
            if want_last_logits and off + len(chunk) == len(tokens):
                batch.logits[len(chunk) - 1] = 1
            self._decode(batch)

    def _decode_embeddings(self, embeddings: np.ndarray, start: int, want_last_logits: bool) -> None:
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.n_embd:
            raise ValueError(f"embeddings must be (n, {self.n_embd}), got {emb.shape}")
        n_total = emb.shape[0]
        batch = self._lib.llama_batch_init(min(self.n_batch, n_total), self.n_embd, 1)
        try:
            for off in range(0, n_total, self.n_batch):
                chunk = emb[off : off + self.n_batch]
                batch.n_tokens = chunk.shape[0]
                ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
                for i in range(chunk.shape[0]):
                    batch.pos[i] = start + off + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 0
                if want_last_logits and off + chunk.shape[0] == n_total:
                    batch.logits[chunk.shape[0] - 1] = 1
                self._decode(batch)
        finally:
            self._lib.llama_batch_free(batch)

    def _decode(self, batch) -> None:
        if self._abort is not None and self._abort():
            raise Cancelled()
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc == _DECODE_ABORTED and self._abort is not None:
            raise Cancelled()
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def logits(self) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def stream(self, sampling: SamplingParams, max_tokens: int) -> Iterator[int]:
        sampler = self._make_sampler(sampling)
        try:
            for _ in range(max_tokens):
                if len(self._evaluated) >= self.n_ctx:
                    return  # context full: the caller reports finish_reason "length"
                tok = self._lib.llama_sampler_sample(sampler, self._ctx, -1)
                if self.is_eog(tok):
                    return
                yield tok
                self._decode_tokens([tok], len(self._evaluated), True)
                self._evaluated.append(tok)
        finally:
            self._lib.llama_sampler_free(sampler)

    def _make_sampler(self, s: SamplingParams):
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if s.has_penalties:
            # first in the chain, as llama.cpp's own samplers do; it counts the tokens it is shown,
            # so show it the sequence so far (the sampler then sees each new token as it is picked)
            # this llama.cpp (vendored by llama-cpp-python 0.3.x) takes n_vocab first; see its llama.h
            penalties = lib.llama_sampler_init_penalties(
                self.n_vocab, s.penalty_last_n, s.repeat_penalty, s.frequency_penalty, s.presence_penalty)
            history = [t for t in self._evaluated if t != _EMBEDDING_KEY]
            for tok in history[-s.penalty_last_n:] if s.penalty_last_n > 0 else history:
                lib.llama_sampler_accept(penalties, tok)
            lib.llama_sampler_chain_add(chain, penalties)
        if s.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(s.min_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(s.temperature))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(s.seed & 0xFFFFFFFF))
        return chain

    @property
    def n_past(self) -> int:
        return len(self._evaluated)

    # -- resources ---------------------------------------------------------------------
    def memory(self) -> MemoryUse:
        import psutil

        return MemoryUse(
            model_bytes=int(self._lib.llama_model_size(self._model)),
            context_bytes=int(self._lib.llama_state_get_size(self._ctx)),
            process_rss_bytes=psutil.Process().memory_info().rss,
        )

    def close(self) -> None:
        if self._ctx:
            if self._active_adapter is not None:  # no context may hold an adapter that is freed
                self._lib.llama_set_adapters_lora(self._ctx, None, 0, None)
            for adapter in self._adapters.values():
                self._lib.llama_adapter_lora_free(adapter)
            self._adapters.clear()
            self._lib.llama_batch_free(self._token_batch)
            self._lib.llama_free(self._ctx)
            self._lib.llama_model_free(self._model)
            self._ctx = None
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
