"""llama.cpp backend, on llama-cpp-python's low-level C API.

The high-level `Llama` class cannot take embedding rows, which multimodal
prompts need, so this drives `llama_decode` directly: token segments and
embedding segments go into batches, sampling uses llama.cpp's sampler chain.

One context holds `n_seq` sequences (slots), each with its own KV cells
(`n_seq_max`, not unified: llama.cpp gives each sequence n_ctx / n_seq cells, as its
server does with `-np`). `decode` evaluates tokens of several sequences in one
`llama_decode`, which is what lets the engine decode many conversations together.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import BundleError, ContextOverflowError, InputError, require
from . import MIN_CTX, Cancelled, EmbeddingSegment, MemoryUse, SamplingParams, Segment, TokenSegment

if TYPE_CHECKING:
    from ..constrained import GrammarState

_EMBEDDING_KEY = -1  # positions filled from embeddings never match a cached prefix
_DECODE_ABORTED = 2  # llama_decode's return code when the abort callback said stop

_log_state: dict = {"callback": None, "errors": [], "last_level": 0, "kv": []}
# llama.cpp's own account of a KV cache it allocated (src/llama-kv-cache.cpp), one line per cache
_KV_REPORT = re.compile(r"llama_kv_cache: size = .*?\(\s*(\d+) cells.*?K \((\w+)\):\s*([\d.]+) MiB, "
                        r"V \((\w+)\):\s*([\d.]+) MiB")
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


@dataclass(frozen=True)
class VocabFingerprint:
    """What two models must share for one to draft for the other: the same token ids meaning the
    same text (llama.cpp's common/speculative.cpp compares type, BOS/EOS and token texts; we also
    require the same size, so no draft can propose an id the target does not have)."""

    kind: int
    n_vocab: int
    bos: int
    eos: int
    digest: str  # sha256 of every token's text, in id order

    def mismatch(self, other: VocabFingerprint) -> str | None:
        """How `other` differs, in a few words, or None."""
        for name, what in (("kind", "tokenizer type"), ("n_vocab", "vocabulary size"), ("bos", "BOS token"),
                           ("eos", "EOS token"), ("digest", "token texts")):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return what if name == "digest" else f"{what} {theirs} instead of {mine}"
        return None


def _vocab_fingerprint(lib, vocab) -> VocabFingerprint:
    h = hashlib.sha256()
    n = lib.llama_vocab_n_tokens(vocab)
    for tok in range(n):
        h.update((lib.llama_vocab_get_text(vocab, tok) or b"") + b"\0")
    return VocabFingerprint(int(lib.llama_vocab_type(vocab)), int(n), int(lib.llama_vocab_bos(vocab)),
                            int(lib.llama_vocab_eos(vocab)), h.hexdigest())


def vocab_fingerprint_of(path: Path | str) -> VocabFingerprint:
    """The vocabulary of the GGUF at `path`, read without its weights (a wrong file fails fast)."""
    lib = _llama()
    _quiet_logs(lib)
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"model file {path} does not exist")
    params = lib.llama_model_default_params()
    params.vocab_only = True
    _log_state["errors"] = []
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        detail = _log_state["errors"][0] if _log_state["errors"] else "unknown error"
        raise BundleError(f"llama.cpp cannot load {path}: {detail} (truncated or not a GGUF model?)")
    try:
        return _vocab_fingerprint(lib, lib.llama_model_get_vocab(model))
    finally:
        lib.llama_model_free(model)


def model_params(lib):
    """llama.cpp's default model parameters, less the AMX kernels unless VISHWAMAI_EDGE_LLAMA_AMX=1.

    A CPU build made on an AMX Xeon (GGML_NATIVE) routes quantized matmuls through AMX tiles; on some
    virtual machines that advertise AMX (Firecracker guests among them) the first matmul then
    segfaults in ggml_backend_amx_mul_mat. Without the extra buffer types the AVX-512 kernels run;
    no edge device has AMX, so only Xeon hosts give up its prompt speed.
    """
    params = lib.llama_model_default_params()
    if b"AMX_INT8 = 1" in lib.llama_print_system_info() and os.environ.get("VISHWAMAI_EDGE_LLAMA_AMX") != "1":
        params.use_extra_bufts = False
    return params


def prompt_keys(segments: Sequence[Segment]) -> list[int]:
    """A prompt as the KV cache records it: token ids, _EMBEDDING_KEY for embedding rows."""
    keys: list[int] = []
    for seg in segments:
        keys.extend(seg.tokens if isinstance(seg, TokenSegment) else [_EMBEDDING_KEY] * len(seg))
    return keys


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
        elif level == 2 and text.startswith(b"llama_kv_cache: size"):
            found = _KV_REPORT.search(text.decode("utf-8", "replace"))
            if found:
                _log_state["kv"].append(found.groups())
        if level != 5:
            _log_state["last_level"] = level

    _log_state["callback"] = callback  # keep a reference: C holds only the pointer
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()


def _kv_report(lines: list[tuple[str, ...]]) -> dict | None:
    """The KV cache llama.cpp allocated, from its log (MiB with two decimals: within 5 KiB a cache)."""
    if not lines:
        return None
    mib = 1024 * 1024
    return {"cells": sum(int(c) for c, *_ in lines), "type_k": lines[0][1], "type_v": lines[0][3],
            "k_bytes": round(sum(float(k) for _, _, k, _, _ in lines) * mib),
            "v_bytes": round(sum(float(v) for *_, v in lines) * mib)}


def default_threads() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


class LlamaCppBackend:
    batched = True  # slots share one context (n_seq)

    @classmethod
    def check(cls, parallel: int, kv_type: str | None, speculative: bool) -> None:
        """Every run-time option is a llama.cpp one; the values are checked where they are used."""

    def __init__(self, lib, model, ctx, path: Path, n_batch: int, n_seq: int = 1):
        self._lib = lib
        self._model = model
        self._ctx = ctx
        self.path = path
        self._vocab = lib.llama_model_get_vocab(model)
        self._special_texts: frozenset[str] | None = None
        self.n_seq = n_seq
        self.n_ctx: int = lib.llama_n_ctx_seq(ctx)  # what one sequence may hold
        self.n_embd: int = lib.llama_model_n_embd(model)
        self.n_vocab: int = lib.llama_vocab_n_tokens(self._vocab)
        self.n_batch = n_batch
        self._token_batch = lib.llama_batch_init(n_batch, 0, 1)
        # per sequence: token id per KV position (_EMBEDDING_KEY for embeddings)
        self._keys: list[list[int]] = [[] for _ in range(n_seq)]
        self._abort: Callable[[], bool] | None = None
        self._adapters: dict[str, object] = {}  # name -> llama_adapter_lora pointer
        self._active_adapter: tuple[str, float] | None = None
        self.kv_type: str = "f16"
        self.kv_report: dict | None = None  # the KV cache as llama.cpp reported allocating it

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
        n_seq: int = 1,
        kv_type: str | None = None,
    ) -> LlamaCppBackend:
        """`n_ctx` is the context of each of the `n_seq` sequences (the KV cache holds n_ctx x n_seq);
        `kv_type` the cache's element type (runtime/kv_cache.py; default f16)."""
        from ..kv_cache import kv_type as get_kv_type

        kv = get_kv_type(kv_type)
        lib = _llama()
        _quiet_logs(lib)
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"model file {path} does not exist")
        if n_ctx < MIN_CTX:
            raise InputError(f"the context length must be at least {MIN_CTX} tokens, got {n_ctx}")
        if n_threads is not None and n_threads < 1:
            raise InputError(f"the thread count must be at least 1, got {n_threads}")
        if not 1 <= n_seq <= lib.llama_max_parallel_sequences():
            raise InputError(f"llama.cpp runs 1 to {lib.llama_max_parallel_sequences()} parallel sequences, "
                             f"not {n_seq}")
        n_batch = min(n_batch, n_ctx * n_seq)
        mparams = model_params(lib)
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
        cparams.n_ctx = n_ctx * n_seq
        cparams.n_seq_max = n_seq
        cparams.kv_unified = False  # each sequence its own cells: one cannot crowd out another
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        cparams.type_k = cparams.type_v = kv.ggml_type
        if kv.quantized:  # llama.cpp stores a quantized V only with flash attention
            cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        _log_state["errors"], _log_state["kv"] = [], []
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            lib.llama_model_free(model)
            detail = _log_state["errors"][-1] if _log_state["errors"] else "out of memory?"
            if kv.quantized:
                raise InputError(f"this llama.cpp build refuses a {kv.name} KV cache for {path.name}: {detail}")
            raise BundleError(f"llama.cpp cannot create a context of {n_seq} x {n_ctx} tokens for {path} "
                              f"({detail})")
        backend = cls(lib, model, ctx, path, n_batch, n_seq)
        backend.kv_type = kv.name
        backend.kv_report = _kv_report(_log_state["kv"])
        return backend

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

    def special_texts(self) -> frozenset[str]:
        if self._special_texts is None:  # once: about 50 k calls
            lib, marked = self._lib, self._lib.LLAMA_TOKEN_ATTR_CONTROL | self._lib.LLAMA_TOKEN_ATTR_USER_DEFINED
            ids = [t for t in range(lib.llama_vocab_n_tokens(self._vocab)) if lib.llama_vocab_get_attr(self._vocab, t) & marked]
            self._special_texts = frozenset(filter(None, (self.token_bytes(t, special=True).decode("utf-8", "replace")
                                                          for t in ids)))
        return self._special_texts

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def adds_bos(self) -> bool:
        """Whether the vocabulary puts BOS before a text (tokenizer.ggml.add_bos_token)."""
        return bool(self._lib.llama_vocab_get_add_bos(self._vocab))

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
    def prefill(self, segments: Sequence[Segment], abort: Callable[[], bool] | None = None, seq: int = 0) -> None:
        rest = self.start(segments, seq)
        keep = len(self._keys[seq])
        try:
            for i, seg in enumerate(rest):
                last = i == len(rest) - 1
                if isinstance(seg, TokenSegment):
                    tokens = list(seg.tokens)
                    for off in range(0, len(tokens), self.n_batch):
                        chunk = tokens[off : off + self.n_batch]
                        self.decode([(seq, chunk, last and off + len(chunk) == len(tokens))], abort)
                else:
                    self.decode_embeddings(seq, seg.embeddings, last, abort)
        except Cancelled:
            self._truncate(keep, seq)  # batches evaluated before the abort stay in memory: drop them
            raise

    def start(self, segments: Sequence[Segment], seq: int = 0) -> list[Segment]:
        """Begin evaluating a prompt in sequence `seq`: keep the prefix it shares with what the
        sequence holds, and return the segments still to evaluate (never empty: the last
        position is evaluated again for fresh logits)."""
        keys = prompt_keys(segments)
        if not keys:
            raise ContextOverflowError("the prompt is empty")
        if len(keys) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(keys)} tokens but the context holds {self.n_ctx}; "
                "shorten it or load the bundle with a larger context"
            )
        keep = min(self.shared_prefix(keys, seq), len(keys) - 1)
        self._truncate(keep, seq)
        rest: list[Segment] = []
        pos = 0
        for seg in segments:
            lo = max(0, keep - pos)
            if lo < len(seg):
                rest.append(TokenSegment(list(seg.tokens)[lo:]) if isinstance(seg, TokenSegment)
                            else EmbeddingSegment(seg.embeddings[lo:]))
            pos += len(seg)
        return rest

    def shared_prefix(self, keys: list[int], seq: int = 0) -> int:
        """How many leading positions of `keys` sequence `seq` already holds."""
        n = 0
        for a, b in zip(self._keys[seq], keys):
            if a != b or a == _EMBEDDING_KEY:
                break
            n += 1
        return n

    def reset(self) -> None:
        """Empty every sequence."""
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)
        for keys in self._keys:
            keys.clear()

    def release(self, seq: int) -> None:
        """Forget sequence `seq` (its KV cells are free for the next prompt)."""
        self._truncate(0, seq)

    def rollback(self, keep: int, seq: int = 0) -> None:
        """Keep the first `keep` positions of sequence `seq` and remove the rest from the KV cache
        (speculative decoding drops the cells of rejected draft tokens)."""
        if keep < len(self._keys[seq]):
            self._truncate(keep, seq)

    def vocab_fingerprint(self) -> VocabFingerprint:
        return _vocab_fingerprint(self._lib, self._vocab)

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

    def _truncate(self, keep: int, seq: int = 0) -> None:
        mem = self._lib.llama_get_memory(self._ctx)
        if keep == 0 and self.n_seq == 1:
            self._lib.llama_memory_clear(mem, True)
        else:
            self._lib.llama_memory_seq_rm(mem, seq, keep, -1)
        del self._keys[seq][keep:]

    def decode(self, items: Sequence[tuple[int, Sequence[int], bool | str | int]],
               abort: Callable[[], bool] | None = None) -> dict[int, list[int]]:
        """Evaluate tokens of several sequences in one `llama_decode` (at most `n_batch` in all):
        each item is (seq, tokens, logits), logits False, True (the last token's), "all", or an index k
        (tokens k and after: their logits only, as a window's scored half needs).
        Returns, per sequence with logits, the batch rows that hold them (for `sample`).
        `abort` is polled while it runs: True stops it (Cancelled), nothing of it is kept."""
        batch = self._token_batch
        n = 0
        rows: dict[int, list[int]] = {}
        for seq, tokens, want in items:
            start = len(self._keys[seq])
            for i, tok in enumerate(tokens):
                batch.token[n] = tok
                batch.pos[n] = start + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                if isinstance(want, bool):
                    out = want and i == len(tokens) - 1
                else:
                    out = want == "all" or (isinstance(want, int) and i >= want)
                batch.logits[n] = out
                if out:
                    rows.setdefault(seq, []).append(n)
                n += 1
        if n > self.n_batch:
            raise ValueError(f"a batch of {n} tokens is over n_batch {self.n_batch}")
        batch.n_tokens = n
        try:
            self._decode(batch, abort)
        except Cancelled:
            for seq, _, _ in items:  # whatever the aborted call stored goes
                self._truncate(len(self._keys[seq]), seq)
            raise
        for seq, tokens, _ in items:
            self._keys[seq].extend(tokens)
        return rows

    def decode_embeddings(self, seq: int, embeddings: np.ndarray, want_last_logits: bool,
                          abort: Callable[[], bool] | None = None) -> None:
        """Evaluate embedding rows (an encoder's output) at the end of sequence `seq`."""
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.n_embd:
            raise ValueError(f"embeddings must be (n, {self.n_embd}), got {emb.shape}")
        n_total = emb.shape[0]
        batch = self._lib.llama_batch_init(min(self.n_batch, n_total), self.n_embd, 1)
        try:
            for off in range(0, n_total, self.n_batch):
                chunk = emb[off : off + self.n_batch]
                start = len(self._keys[seq])
                batch.n_tokens = chunk.shape[0]
                ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
                for i in range(chunk.shape[0]):
                    batch.pos[i] = start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = 0
                if want_last_logits and off + chunk.shape[0] == n_total:
                    batch.logits[chunk.shape[0] - 1] = 1
                try:
                    self._decode(batch, abort)
                except Cancelled:
                    self._truncate(start, seq)
                    raise
                self._keys[seq].extend([_EMBEDDING_KEY] * chunk.shape[0])
        finally:
            self._lib.llama_batch_free(batch)

    def _decode(self, batch, abort: Callable[[], bool] | None) -> None:
        if abort is not None and abort():
            raise Cancelled()
        self._abort = abort
        try:
            rc = self._lib.llama_decode(self._ctx, batch)
        finally:
            self._abort = None
        if rc == _DECODE_ABORTED and abort is not None:
            raise Cancelled()
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def logits(self, row: int = -1) -> np.ndarray:
        """Logits of batch row `row` of the last `decode` (-1: its last row with logits)."""
        ptr = self._lib.llama_get_logits_ith(self._ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def logits_at(self, rows: Sequence[int]) -> np.ndarray:
        """Logits of batch rows `rows` of the last `decode` (the rows it returned), (len(rows), n_vocab)."""
        out = np.empty((len(rows), self.n_vocab), dtype=np.float32)
        for i, row in enumerate(rows):
            ptr = self._lib.llama_get_logits_ith(self._ctx, row)
            out[i] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    def score(self, tokens: Sequence[int], start: int = 0) -> np.ndarray:
        """Logits at positions `start`.. of `tokens`, evaluated from an empty cache (eval's windows, a
        choice's likelihood), (len(tokens) - start, n_vocab); no other position's are computed."""
        if len(tokens) > self.n_ctx:
            raise ContextOverflowError(f"a window of {len(tokens)} tokens is over the context of {self.n_ctx}")
        self.reset()
        out = np.empty((len(tokens) - start, self.n_vocab), dtype=np.float32)
        for off in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[off:off + self.n_batch])
            first = max(start - off, 0)
            rows = self.decode([(0, chunk, first if first < len(chunk) else False)]).get(0, [])
            if rows:
                out[off + first - start:off + len(chunk) - start] = self.logits_at(rows)
        self.reset()
        return out

    def stream(self, sampling: SamplingParams, max_tokens: int, seq: int = 0,
               grammar: GrammarState | None = None) -> Iterator[int]:
        sampler = self.sampler(sampling, seq)
        try:
            for _ in range(max_tokens):
                if len(self._keys[seq]) >= self.n_ctx:
                    return  # context full: the caller reports finish_reason "length"
                tok = self.sample(sampler, -1, grammar)
                if self.is_eog(tok):
                    return
                yield tok
                self.decode([(seq, [tok], True)])
        finally:
            self.free_sampler(sampler)

    def sample(self, sampler, row: int = -1, grammar: GrammarState | None = None) -> int:
        """Sample from the logits of batch row `row` (-1: the last evaluated); the sampler
        records the token it picked (penalties see it from then on). With `grammar`, only a token
        it allows can be picked, and the grammar advances on it."""
        if grammar is not None:  # masked where llama.cpp's sampler reads them
            grammar.mask(np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._ctx, row), shape=(self.n_vocab,)))
        tok = int(self._lib.llama_sampler_sample(sampler, self._ctx, row))
        if grammar is not None and not self.is_eog(tok):
            grammar.accept(tok)
        return tok

    @property
    def vocab_pointer(self) -> Any:
        """llama.cpp's vocabulary handle (constrained replies read the tokens from it)."""
        return self._vocab

    def free_sampler(self, sampler) -> None:
        self._lib.llama_sampler_free(sampler)

    def distribution(self, chain, row: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """The distribution `chain` (a `sampler(..., final=False)`) would draw from at batch row
        `row`: (token ids, probabilities) of the candidates its filters keep. Speculative sampling
        needs these probabilities; llama.cpp's dist sampler would only return one draw."""
        lib = self._lib
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self._ctx, row), shape=(self.n_vocab,))
        cand = (lib.llama_token_data * self.n_vocab)()
        view = np.frombuffer(cand, dtype=_TOKEN_DATA)
        view["id"] = np.arange(self.n_vocab, dtype=np.int32)
        view["logit"] = logits
        view["p"] = 0.0
        arr = lib.llama_token_data_array(ctypes.cast(cand, lib.llama_token_data_p), self.n_vocab, -1, False)
        lib.llama_sampler_apply(chain, ctypes.byref(arr))
        # a sampler may point `data` elsewhere inside the buffer: read what it points at
        offset = (ctypes.cast(arr.data, ctypes.c_void_p).value or 0) - ctypes.addressof(cand)
        kept = view[offset // _TOKEN_DATA.itemsize:][: arr.size]
        z = kept["logit"].astype(np.float64)
        z = np.exp(z - z.max())
        return kept["id"].copy(), z / z.sum()

    def accept(self, chain, token: int) -> None:
        """Tell `chain` that `token` was emitted (its penalties count it from then on)."""
        self._lib.llama_sampler_accept(chain, token)

    def sampler(self, s: SamplingParams, seq: int = 0, final: bool = True):
        """A llama.cpp sampler chain for one reply in sequence `seq` (free it with `free_sampler`).
        Without `final` it lacks the last step (greedy pick or random draw): `distribution` reads it."""
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if s.has_penalties:
            # first in the chain, as llama.cpp's own samplers do; it counts the tokens it is shown,
            # so show it the sequence so far (the sampler then sees each new token as it is picked)
            # this llama.cpp (vendored by llama-cpp-python 0.3.x) takes n_vocab first; see its llama.h
            penalties = lib.llama_sampler_init_penalties(
                self.n_vocab, s.penalty_last_n, s.repeat_penalty, s.frequency_penalty, s.presence_penalty)
            history = [t for t in self._keys[seq] if t != _EMBEDDING_KEY]
            for tok in history[-s.penalty_last_n:] if s.penalty_last_n > 0 else history:
                lib.llama_sampler_accept(penalties, tok)
            lib.llama_sampler_chain_add(chain, penalties)
        if s.temperature <= 0:
            if final:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(s.min_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(s.temperature))
        if final:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(s.seed & 0xFFFFFFFF))
        return chain

    @property
    def n_past(self) -> int:
        return len(self._keys[0])

    def n_past_of(self, seq: int) -> int:
        return len(self._keys[seq])

    def keys(self, seq: int) -> list[int]:
        """What sequence `seq` holds, one key per position (a copy)."""
        return list(self._keys[seq])

    # -- resources ---------------------------------------------------------------------
    def memory(self) -> MemoryUse:
        import psutil

        return MemoryUse(
            model_bytes=int(self._lib.llama_model_size(self._model)),
            context_bytes=int(self._lib.llama_state_get_size(self._ctx)),
            process_rss_bytes=psutil.Process().memory_info().rss,
            kv_cache_bytes=(self.kv_report["k_bytes"] + self.kv_report["v_bytes"]) if self.kv_report else None,
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
