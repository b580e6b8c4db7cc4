"""A bundle loaded for inference: the LLM backend with its slots, speculative decoding and adapters, the
encoders, the prompt planner; images and transcripts kept for the turns that follow."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BundleError, InputError
from .backends import MIN_CTX, LLMBackend, SupportsAdapters, SupportsGrammar, backend_class
from .bundle import Bundle
from .chat_template import CHATML_TEMPLATE
from .constrained import Compiler, Grammar
from .encoder_registry import load_encoders
from .manifest import AdapterEntry
from .options import RuntimeOptions
from .prompts import planner_for
from .prompts.builder import PromptBuilder
from .speculative import Speculator, resolve_options
from .tools import Choice, Tool, ToolUse, format_for, grammar_text

if TYPE_CHECKING:
    from .session import ChatSession

IMAGE_CACHE = 8  # encoded images a pipeline keeps for the turns that follow


class Pipeline:
    """A bundle loaded for inference: the LLM backend and, for multimodal bundles, encoders."""

    def __init__(self, bundle: Bundle, llm: LLMBackend, encoders: dict[str, Any] | None = None,
                 speculative: Speculator | None = None):
        self.bundle = bundle
        self.llm = llm
        self.encoders: dict[str, Any] = encoders or {}
        self.speculative = speculative  # replies decode speculatively, one request at a time
        self.chat_template: str = bundle.llm.chat_template or llm.chat_template() or CHATML_TEMPLATE
        # image digest -> encoder rows, audio digest -> transcript; most recent last
        self._encoded: OrderedDict[bytes, Any] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.planner = planner_for(bundle.llm, self.encoders.get("image"))  # where images go in a prompt
        # an audio encoder either feeds the LLM rows at `audio_token` (embeddings) or transcribes (cascade)
        self.audio_embeds = getattr(self.encoders.get("audio"), "mode", None) == "embeddings"
        self.audio_token_id: int | None = None
        if self.audio_embeds:
            self.audio_token_id = bundle.llm.audio_token.id if bundle.llm.audio_token else None
            if self.audio_token_id is None:
                raise BundleError(f"bundle {bundle.root}: manifest llm.audio_token has no id, but encoders.audio "
                                  "gives embeddings")
        # templates written for image parts (LLaVA's) read text from part lists only
        self.structured_content = "image" in self.encoders or self.audio_embeds
        self.prompts = PromptBuilder(self)
        self._compiler: Compiler | None = None  # JSON schemas -> grammars, made on first use

    @classmethod
    def load(cls, path: Path | str, options: RuntimeOptions | None = None) -> Pipeline:
        """`options.parallel` sequences (None: the bundle's default, manifest runtime.parallel) share a
        context of `options.n_ctx` tokens, split evenly as llama.cpp's server splits `-c` among `-np`
        slots; without it each gets the bundle's context. Speculative decoding (None: the bundle's
        runtime.speculative) decodes one request at a time. What the bundle's backend cannot honour is
        refused before the model loads."""
        options = options or RuntimeOptions()
        bundle = Bundle.load(path, verify=options.verify)
        defaults = bundle.runtime_defaults
        backend = backend_class(bundle.llm.backend)
        speculative = options.speculative or resolve_options(None, None, None, defaults.speculative)
        parallel = options.parallel
        if speculative.enabled:
            if parallel not in (None, 1):
                raise InputError(f"speculative decoding runs one request at a time: use --parallel 1, or "
                                 f"--speculative off to decode {parallel} together")
            if speculative.mode == "draft" and {"image", "audio"} & set(bundle.manifest.encoders):
                raise InputError("a draft model cannot read image or audio rows; use --speculative lookup "
                                 "with this bundle")
            parallel = 1
            if speculative.max_draft is None:
                speculative = replace(speculative, max_draft=defaults.draft_max)
        if parallel is None:
            parallel = defaults.parallel if backend.batched else 1
        backend.check(parallel, options.kv_type, speculative.enabled)
        per_slot = slot_context(options.n_ctx, parallel, defaults.n_ctx)
        extra: dict[str, Any] = {"n_seq": parallel, "kv_type": options.kv_type or defaults.kv_type} \
            if backend.batched else {}
        llm = backend.load(bundle.llm_path(), n_ctx=per_slot, n_threads=options.n_threads, **extra)
        spec = None
        try:
            spec = Speculator.load(speculative, llm, options.n_threads)
            encoders = load_encoders(bundle, options.n_threads)
            load_adapters(bundle, llm)
        except BaseException:
            if spec is not None:
                spec.close()
            llm.close()
            raise
        return cls(bundle, llm, encoders, spec)

    @property
    def adapters(self) -> dict[str, AdapterEntry]:
        """The bundle's LoRA adapters: name -> manifest entry (file, scale, check ...)."""
        return dict(self.bundle.manifest.adapters) if isinstance(self.llm, SupportsAdapters) else {}

    def check_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            have = ", ".join(sorted(self.adapters)) or "none"
            raise InputError(f"this bundle has no adapter {name!r} (adapters: {have})")

    def use_adapter(self, name: str | None) -> None:
        """Apply adapter `name` (None: the base alone) to what is generated next."""
        self.check_adapter(name)
        if isinstance(self.llm, SupportsAdapters):
            self.llm.use_adapter(name, self.adapters[name].scale if name else 1.0)

    def compile_schema(self, schema: dict[str, Any] | None, where: str = "json_schema") -> Grammar:
        """A JSON schema (None: any JSON object) as a grammar for `session(grammar=...)`; a keyword that
        cannot be enforced is refused in one line naming it (`where` says whose schema it is)."""
        return self._grammars("constrain replies to a schema").compile(schema, where)

    def tool_use(self, tools: list[Tool] | tuple[Tool, ...], choice: Choice = "auto", parallel: bool = True,
                 text_schema: dict[str, Any] | None = None, text_json: bool = False) -> ToolUse:
        """`tools` offered to the model for `session(tools=...)`: the call format of this model's chat template
        (or the fallback) and the grammar of a reply under `choice` (`text_schema`/`text_json`: a reply that is
        not a call is JSON). A schema that cannot be enforced is refused, naming the tool's index."""
        compiler = self._grammars("call tools")
        tools = tuple(tools)
        names = [t.name for t in tools]
        if not tools or len(set(names)) != len(names):
            raise InputError("tools: give one or more functions with different names")
        fmt, native = format_for(self.chat_template)
        lark = grammar_text(tools, choice, parallel, fmt, compiler.controls, text_schema, text_json)
        return ToolUse(tools, choice, parallel, fmt, native, compiler.compile_lark(lark, "tools"))

    def _grammars(self, what: str) -> Compiler:
        if not isinstance(self.llm, SupportsGrammar):
            raise InputError(f"this bundle's backend ({self.bundle.llm.backend}) cannot {what}; "
                             "use its llama.cpp bundle")
        with self._cache_lock:
            if self._compiler is None:
                self._compiler = Compiler(self.llm)
        return self._compiler

    def session(self, **kwargs: Any) -> ChatSession:
        from .session import ChatSession

        kwargs.setdefault("system_prompt", self.bundle.runtime_defaults.system_prompt)
        return ChatSession(self, **kwargs)

    def encode_images(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Encoder rows per image. A conversation resends its earlier images every turn (the chat
        page does): the last few are kept by content digest and not encoded again."""
        keys = [hashlib.blake2b(np.ascontiguousarray(im).tobytes() + str(im.shape).encode(), digest_size=16).digest()
                for im in images]
        return self._encode_cached(keys, images, self.encoders["image"].encode)

    def encode_audio(self, clips: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        """Embedding rows per (samples, rate) clip, cached as images are (embeddings mode)."""
        keys = [b"rows" + hashlib.blake2b(np.ascontiguousarray(x).tobytes() + str(rate).encode(),
                                          digest_size=16).digest() for x, rate in clips]
        return self._encode_cached(keys, clips, self.encoders["audio"].encode)

    def _encode_cached(self, keys: list[bytes], items: list[Any], encode: Callable[[list[Any]], list[np.ndarray]]
                       ) -> list[np.ndarray]:
        with self._cache_lock:
            found = {k: self._encoded[k] for k in keys if k in self._encoded}
        missing = [i for i, k in enumerate(keys) if k not in found]
        if missing:
            for i, rows in zip(missing, encode([items[i] for i in missing])):
                found[keys[i]] = rows
        with self._cache_lock:
            for k in keys:
                self._encoded[k] = found[k]
                self._encoded.move_to_end(k)
            while len(self._encoded) > IMAGE_CACHE:
                self._encoded.popitem(last=False)
        return [found[k] for k in keys]

    def transcribe(self, samples: np.ndarray, sample_rate: int) -> str:
        """What the bundle's speech encoder hears in the audio (kept for resent audio, like images)."""
        encoder = self.encoders.get("audio")
        if encoder is None:
            raise InputError("this bundle has no audio encoder; send text only, or build a bundle with a "
                             "speech section (recipes/smollm2-135m-whisper.yaml)")
        if self.audio_embeds:
            raise InputError("this bundle's audio encoder feeds the LLM directly and writes no transcript; "
                             "send the audio as a chat part")
        key = b"audio" + hashlib.blake2b(np.ascontiguousarray(samples).tobytes() + str(sample_rate).encode(),
                                         digest_size=16).digest()
        with self._cache_lock:
            if key in self._encoded:
                return self._encoded[key]
        text = encoder.transcribe(samples, sample_rate)  # outside the lock: the API's route may run beside
        with self._cache_lock:
            self._encoded[key] = text
            while len(self._encoded) > IMAGE_CACHE:
                self._encoded.popitem(last=False)
        return text

    def forget_images(self) -> None:
        """Drop the encoded-image and transcript cache (the profile times the encoders on every run)."""
        with self._cache_lock:
            self._encoded.clear()

    def close(self) -> None:
        for encoder in self.encoders.values():
            encoder.close()
        if self.speculative is not None:
            self.speculative.close()
        self.llm.close()


def slot_context(n_ctx: int | None, parallel: int, default: int) -> int:
    """Each slot's context: `n_ctx` split among `parallel` slots, or `default` each without it."""
    if parallel < 1:
        raise InputError(f"--parallel must be at least 1, got {parallel}")
    if n_ctx is None or parallel == 1:
        return n_ctx or default  # one slot: the backend checks the length itself
    per_slot = n_ctx // parallel
    if per_slot < MIN_CTX:
        raise InputError(f"{parallel} slots cannot share a context of {n_ctx} tokens ({per_slot} each, under the "
                         f"minimum of {MIN_CTX}); lower --parallel or raise --n-ctx")
    return per_slot


def load_adapters(bundle: Bundle, llm: LLMBackend) -> None:
    """The manifest's `adapters` section into the backend (off until a request names one). Each was
    built for this bundle's base weights; a manifest that says otherwise is refused."""
    entries = bundle.manifest.adapters
    if not entries or not isinstance(llm, SupportsAdapters):
        return  # a backend without run-time LoRA: the bundle serves its base (Pipeline.adapters is empty)
    for name, entry in entries.items():
        if entry.base_digest != bundle.llm.weights_digest:
            raise BundleError(f"bundle {bundle.root}: adapter {name!r} was made for other base weights than the "
                              "bundle's model")
        llm.load_adapter(name, bundle.file(entry.file))
