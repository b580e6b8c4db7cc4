"""Chat on a loaded pipeline: template, prefill, streamed and incrementally detokenized text.

Messages are `{"role", "content"}` dicts; content is a string, or a list of parts
`{"type": "text", "text": ...}`, `{"type": "image", "pixels": (H, W, 3) uint8}` and, for
bundles whose audio encoder feeds the LLM (manifest `encoders.audio.mode` embeddings),
`{"type": "audio", "samples": (n,) float32, "rate": Hz}`. The chat template writes one
placeholder token per image (LLaVA's `<image>`) or audio clip (`<audio>`); the encoder's rows
replace it in the prompt as an embedding segment, so an image takes `n_tokens` positions of
the context and is never part of a reused KV prefix. A sliced image (MiniCPM-V: an overview
and a grid of slices) takes a variable number of blocks of rows: its marker becomes its
placeholder text, and each block's run of unk tokens becomes one embedding segment. Other
bundles with an audio encoder transcribe audio first and send the text (the speech-to-text cascade).
"""

from __future__ import annotations

import codecs
import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError, ContextOverflowError, InputError
from .backends import (
    MIN_CTX,
    Cancelled,
    EmbeddingSegment,
    LLMBackend,
    SamplingParams,
    Segment,
    TokenSegment,
    load_backend,
)
from .bundle import Bundle
from .chat_template import CHATML_TEMPLATE, render_chat
from .speculative import SpeculativeCounts, SpeculativeOptions, Speculator, resolve_options


DECODE_RATE_DEFINITION = (
    "decode tokens/s = (generated tokens - 1) / (time of the last generated token - time of the first): "
    "the first token comes from the prompt's logits, each later one costs one decode step"
)


def decode_tokens_per_s(tokens: int, first_to_last_s: float) -> float:
    """The one definition of decode speed used everywhere (see DECODE_RATE_DEFINITION)."""
    return (tokens - 1) / first_to_last_s if tokens > 1 and first_to_last_s > 0 else 0.0


# Client text holding a control token's string is wrapped in these (Unicode private use) for tokenizing
PROTECT_OPEN, PROTECT_CLOSE = "\ue000", "\ue001"
_PROTECTED = re.compile(f"[{PROTECT_OPEN}{PROTECT_CLOSE}]")

@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0  # prompt evaluation, including the first sampled token's logits
    images: int = 0
    audio_clips: int = 0  # audio parts that entered the LLM as embeddings
    encode_s: float = 0.0  # image and audio encoders (inside prefill_s and ttft_s)
    heard: list[str] = field(default_factory=list)  # transcripts of the turn's audio parts
    transcribe_s: float = 0.0  # speech to text, before the prompt is built
    ttft_s: float = 0.0  # request start -> first text out
    decode_s: float = 0.0  # first generated token -> last generated token
    finish_reason: str = "stop"  # stop | length | cancelled
    dropped_messages: int = 0  # oldest turns left out so that the conversation fits the context
    speculative: str = "off"  # off | lookup | draft (speculative.py)
    drafted_tokens: int = 0  # draft tokens the target verified
    accepted_tokens: int = 0  # of them, the ones it kept

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return decode_tokens_per_s(self.completion_tokens, self.decode_s)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


class Detokenizer:
    """Bytes of pieces in, complete UTF-8 text out: a multi-byte character split across
    tokens is held back until its last byte arrives."""

    def __init__(self, backend: LLMBackend):
        self._backend = backend
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self._backend.token_bytes(token))

    def flush(self) -> str:
        """End of reply: a character cut off by the length limit is dropped, not shown as U+FFFD."""
        self._decoder.reset()
        return ""


IMAGE_CACHE = 8  # encoded images a pipeline keeps for the turns that follow
IMAGE_SENTINEL = -200  # where an image goes in a prompt tokenized around a text placeholder (VILA's value)


@dataclass
class Prompt:
    """A rendered, tokenized conversation: one placeholder token per image (and per audio clip,
    embeddings mode), each kind in its order."""

    tokens: list[int]
    images: list[np.ndarray]
    image_positions: list[int]  # one per block of rows: an image with slices (MiniCPM-V) has several
    tokens_per_image: int = 0  # rows per block
    blocks_per_image: list[int] = field(default_factory=list)  # empty: one block each
    audio: list[tuple[np.ndarray, int]] = field(default_factory=list)  # (samples, rate)
    audio_positions: list[int] = field(default_factory=list)
    tokens_per_audio: int = 0

    @property
    def size(self) -> int:
        """Context positions it takes: each placeholder becomes the encoder's rows."""
        return (len(self.tokens) + len(self.image_positions) * (self.tokens_per_image - 1)
                + len(self.audio) * (self.tokens_per_audio - 1))

    def segments(self, embeddings: list[np.ndarray], audio_embeddings: list[np.ndarray] | tuple = ()) -> list[Segment]:
        out: list[Segment] = []
        start = 0
        if self.blocks_per_image:  # each image's rows, one block per position
            n = self.tokens_per_image
            embeddings = [rows[i * n:(i + 1) * n] for rows, k in zip(embeddings, self.blocks_per_image)
                          for i in range(k)]
        placed = sorted([*zip(self.image_positions, embeddings), *zip(self.audio_positions, audio_embeddings)],
                        key=lambda item: item[0])
        for pos, rows in placed:
            if pos > start:
                out.append(TokenSegment(self.tokens[start:pos]))
            out.append(EmbeddingSegment(rows))
            start = pos + 1
        if start < len(self.tokens):
            out.append(TokenSegment(self.tokens[start:]))
        return out


class Pipeline:
    """A bundle loaded for inference: the LLM backend and, for multimodal bundles, encoders."""

    def __init__(self, bundle: Bundle, llm: LLMBackend, encoders: dict[str, Any] | None = None,
                 speculative: Speculator | None = None):
        self.bundle = bundle
        self.llm = llm
        self.encoders: dict[str, Any] = encoders or {}
        self.speculative = speculative  # replies decode speculatively, one request at a time
        manifest_template = bundle.llm.get("chat_template")
        self.chat_template: str = manifest_template or llm.chat_template() or CHATML_TEMPLATE
        # image digest -> encoder rows, audio digest -> transcript; most recent last
        self._encoded: OrderedDict[bytes, Any] = OrderedDict()
        self._cache_lock = threading.Lock()
        placeholder = bundle.llm.get("image_token") or {}
        self.image_token_id: int | None = placeholder.get("id") if "image" in self.encoders else None
        # A placeholder with no id is no vocabulary entry (VILA's `<image>`): the prompt is tokenized
        # piece by piece around its text and a sentinel marks each image, as VILA's own
        # tokenizer_image_token does with IMAGE_TOKEN_INDEX; the sentinel never reaches the LLM.
        self.image_split_text: str | None = None
        if "image" in self.encoders and placeholder.get("text") and placeholder.get("id") is None:
            self.image_split_text, self.image_token_id = placeholder["text"], IMAGE_SENTINEL
        # an audio encoder either feeds the LLM rows at `audio_token` (embeddings) or transcribes (cascade)
        self.audio_embeds = getattr(self.encoders.get("audio"), "mode", None) == "embeddings"
        self.audio_token_id: int | None = None
        if self.audio_embeds:
            self.audio_token_id = (bundle.llm.get("audio_token") or {}).get("id")
            if not isinstance(self.audio_token_id, int):
                raise BundleError(f"bundle {bundle.root}: manifest llm.audio_token has no id, but encoders.audio "
                                  "gives embeddings")
        # templates written for image parts (LLaVA's) read text from part lists only
        self.structured_content = "image" in self.encoders or self.audio_embeds

    @classmethod
    def load(
        cls,
        path: Path | str,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        verify: bool = True,
        parallel: int | None = 1,
        speculative: SpeculativeOptions | None = None,
        kv_type: str | None = None,
    ) -> Pipeline:
        """`parallel` sequences (None: the bundle's target's default) share a context of `n_ctx`
        tokens, split evenly as llama.cpp's server splits `-c` among `-np` slots; without
        `n_ctx` each gets the bundle's context. `speculative` (None: the bundle's
        `runtime.speculative`, else off) decodes one request at a time. `kv_type` (f16, q8_0,
        q4_0) overrides the bundle's KV-cache type (manifest runtime.kv_type, default f16)."""
        bundle = Bundle.load(path, verify=verify)
        backend = bundle.llm.get("backend", "llamacpp")
        options: dict[str, Any] = {}
        if speculative is None:
            speculative = resolve_options(None, None, None, bundle.runtime_defaults.get("speculative"))
        if speculative.enabled:
            if parallel not in (None, 1):
                raise InputError(f"speculative decoding runs one request at a time: use --parallel 1, or "
                                 f"--speculative off to decode {parallel} together")
            if backend != "llamacpp":
                raise InputError(f"speculative decoding needs the llama.cpp backend, not {backend}; "
                                 "use --speculative off")
            if speculative.mode == "draft" and bundle.manifest.get("encoders"):
                raise InputError("a draft model cannot read image or audio rows; use --speculative lookup "
                                 "with this bundle")
            parallel = 1
            if speculative.max_draft is None:
                speculative = replace(speculative, max_draft=_target(bundle).draft_max)
        if parallel is None:
            parallel = default_parallel(bundle) if backend == "llamacpp" else 1
        per_slot = slot_context(n_ctx, parallel, int(bundle.runtime_defaults.get("n_ctx", 2048)))
        if parallel != 1:
            if backend != "llamacpp":
                raise InputError(f"the {backend} backend runs one request at a time here; use --parallel 1")
            options["n_seq"] = parallel
        kv = kv_type or bundle.runtime_defaults.get("kv_type")
        if backend == "llamacpp":
            options["kv_type"] = kv
        elif kv_type is not None:
            raise InputError(f"--kv-type is a llama.cpp setting; the {backend} backend sets its cache at engine build")
        llm = load_backend(backend, bundle.llm_path(), n_ctx=per_slot, n_threads=n_threads, **options)
        spec = None
        try:
            spec = Speculator.load(speculative, llm, n_threads)
            encoders = load_encoders(bundle, n_threads)
            load_adapters(bundle, llm)
        except BaseException:
            if spec is not None:
                spec.close()
            llm.close()
            raise
        return cls(bundle, llm, encoders, spec)

    @property
    def adapters(self) -> dict[str, dict[str, Any]]:
        """The bundle's LoRA adapters: name -> manifest entry (file, scale, check ...)."""
        entries = self.bundle.manifest.get("adapters") or {}
        return entries if hasattr(self.llm, "use_adapter") else {}

    def check_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            have = ", ".join(sorted(self.adapters)) or "none"
            raise InputError(f"this bundle has no adapter {name!r} (adapters: {have})")

    def use_adapter(self, name: str | None) -> None:
        """Apply adapter `name` (None: the base alone) to what is generated next."""
        self.check_adapter(name)
        if hasattr(self.llm, "use_adapter"):
            scale = float(self.adapters[name].get("scale", 1.0)) if name else 1.0
            self.llm.use_adapter(name, scale)

    def session(self, **kwargs: Any) -> ChatSession:
        kwargs.setdefault("system_prompt", self.bundle.runtime_defaults.get("system_prompt"))
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


def _target(bundle: Bundle):
    """The bundle's target profile (targets.py); a bare GGUF gets laptop-cpu's."""
    from ..targets import TARGETS

    target = bundle.manifest.get("target") or {}
    name = target.get("name") if isinstance(target, dict) else None
    return TARGETS.get(name or "laptop-cpu", TARGETS["laptop-cpu"])


def default_parallel(bundle: Bundle) -> int:
    """The slots a bundle's target runs by default (targets.py); a bare GGUF gets laptop-cpu's."""
    return _target(bundle).parallel


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


def load_encoders(bundle: Bundle, n_threads: int | None = None) -> dict[str, Any]:
    """The manifest's `encoders` section: kind -> a loaded encoder (ONNX Runtime sessions)."""
    from .encoders import AudioEmbeddingEncoder, ImageEncoder, SpeechEncoder

    entries = bundle.manifest.get("encoders") or {}
    if not isinstance(entries, dict):
        raise BundleError(f"bundle {bundle.root}: manifest encoders must be a mapping")
    out: dict[str, Any] = {}
    try:
        for kind, entry in entries.items():
            if kind == "image" and isinstance(entry, dict) and entry.get("kind") == "minicpmv":
                from .minicpmv import MiniCPMVImageEncoder

                out[kind] = MiniCPMVImageEncoder.from_manifest(bundle, entry, threads=n_threads)
            elif kind == "image" and isinstance(entry, dict) and "file" in entry:
                out[kind] = ImageEncoder.from_manifest(bundle.file(entry["file"]), entry, threads=n_threads)
            elif kind == "audio" and isinstance(entry, dict) and entry.get("mode") == "embeddings":
                out[kind] = AudioEmbeddingEncoder.from_manifest(bundle.file(entry.get("file", "")), entry,
                                                                threads=n_threads)
            elif kind == "audio" and isinstance(entry, dict):
                out[kind] = SpeechEncoder.from_bundle(bundle, entry, threads=n_threads)
            else:
                raise BundleError(f"bundle {bundle.root}: manifest encoders.{kind} is not an encoder this runtime has")
    except BaseException:
        for encoder in out.values():
            encoder.close()
        raise
    return out


def load_adapters(bundle: Bundle, llm: LLMBackend) -> None:
    """The manifest's `adapters` section into the backend (off until a request names one). Each was
    built for this bundle's base weights; a manifest that says otherwise is refused."""
    entries = bundle.manifest.get("adapters") or {}
    if not entries:
        return
    if not isinstance(entries, dict):
        raise BundleError(f"bundle {bundle.root}: manifest adapters must be a mapping")
    if not hasattr(llm, "load_adapter"):
        return  # a backend without run-time LoRA: the bundle serves its base (Pipeline.adapters is empty)
    base = bundle.llm.get("weights_digest")
    for name, entry in entries.items():
        if not isinstance(entry, dict) or "file" not in entry:
            raise BundleError(f"bundle {bundle.root}: manifest adapters.{name} has no file")
        if entry.get("base_digest") != base:
            raise BundleError(f"bundle {bundle.root}: adapter {name!r} was made for other base weights than the "
                              "bundle's model")
        llm.load_adapter(name, bundle.file(entry["file"]))


class ChatSession:
    """A conversation. `ask` streams the reply to a user turn and records both turns."""

    def __init__(
        self,
        pipeline: Pipeline,
        system_prompt: str | None = None,
        sampling: SamplingParams | None = None,
        max_tokens: int = 512,
        stop: list[str] | None = None,
        adapter: str | None = None,
        speculative: Speculator | None | bool = True,
    ):
        """`speculative`: True, the pipeline's speculative decoding (if it has one); False, plain
        decoding; or a `Speculator` of the caller's (profile compares them on one pipeline)."""
        self.pipeline = pipeline
        self.llm = pipeline.llm
        self.speculative: Speculator | None = (pipeline.speculative if speculative is True
                                               else speculative or None)
        pipeline.check_adapter(adapter)
        self.adapter = adapter  # the LoRA adapter every reply of this conversation uses (None: the base)
        self.sampling = sampling or SamplingParams()
        self.max_tokens = max_tokens
        self.stop = list(stop or [])
        self.messages: list[dict[str, Any]] = []
        if system_prompt:
            self.messages.append({"role": "system", "content": system_prompt})
        self.last_stats = GenerationStats()

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]

    def ask(self, text: str, images: list[np.ndarray] | tuple[np.ndarray, ...] = (),
            audio: list[tuple[np.ndarray, int]] | tuple[tuple[np.ndarray, int], ...] = ()) -> Iterator[str]:
        """Stream the reply to a user turn of text, images (each (H, W, 3) uint8, shown first) and
        audio ((samples, rate) pairs, heard as text: `last_stats.heard` says what was heard)."""
        if not text.strip() and not images and not audio:
            raise InputError("the message is empty")
        t = time.perf_counter()
        embedded = list(audio) if self.pipeline.audio_embeds else []  # the LLM hears these itself
        heard = [] if embedded else [self.pipeline.transcribe(samples, rate) for samples, rate in audio]
        transcribe_s = time.perf_counter() - t if heard else 0.0
        if audio and not embedded and not any(h.strip() for h in heard) and not text.strip() and not images:
            raise InputError("nothing was heard in the audio (silence?)")
        spoken = " ".join(h for h in heard if h.strip())
        text = f"{spoken} {text}".strip() if spoken else text
        content: str | list[dict[str, Any]] = text
        if images or embedded:
            content = [*({"type": "image", "pixels": p} for p in images),
                       *({"type": "audio", "samples": x, "rate": r} for x, r in embedded),
                       {"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content})
        self.messages, _ = self.fit_history(self.messages)
        reply: list[str] = []
        try:
            for piece in self.generate(self.messages, heard=heard, transcribe_s=transcribe_s):
                reply.append(piece)
                yield piece
        except BaseException:
            self.messages.pop()  # a failed turn leaves the conversation as it was
            raise
        self.messages.append({"role": "assistant", "content": "".join(reply)})

    def fit_history(self, messages: list[dict[str, Any]], reserve: int = 64) -> tuple[list[dict[str, Any]], int]:
        """Drop the oldest exchanges until the prompt leaves `reserve` tokens for the reply;
        returns the kept messages and how many were dropped. System messages always stay.

        A single message that does not fit is left alone: prefill reports it clearly. The
        candidates (one exchange fewer each) are searched by bisection, so a long history costs
        a few tokenizations, not one per exchange.
        """
        candidates = [list(messages)]
        while True:
            kept = list(candidates[-1])
            turns = [i for i, m in enumerate(kept) if m["role"] != "system"]
            if len(turns) <= 1:
                break
            # an exchange is a user turn and the replies up to the next user turn
            end = next((i for i in turns[1:] if kept[i]["role"] == "user"), turns[-1])
            del kept[turns[0]:end]
            candidates.append(kept)

        def fits(k: int) -> bool:
            return self.prompt(candidates[k]).size + reserve <= self.llm.n_ctx

        lo, hi = 0, len(candidates) - 1  # the answer: the first candidate that fits, else the last
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(mid):
                hi = mid
            else:
                lo = mid + 1
        return candidates[lo], len(messages) - len(candidates[lo])

    def prompt(self, messages: list[dict[str, Any]]) -> Prompt:
        """Render and tokenize `messages`; images and audio stay placeholders, collected in their order."""
        parts = [part for m in messages if isinstance(m["content"], list) for part in m["content"]]
        images = [part["pixels"] for part in parts if part.get("type") == "image"]
        clips = [(part["samples"], part["rate"]) for part in parts if part.get("type") == "audio"]
        tokens = self.prompt_tokens(messages)
        prompt = Prompt(tokens, [], [])
        if images:
            encoder, token_id = self.pipeline.encoders.get("image"), self.pipeline.image_token_id
            if encoder is None or token_id is None:
                raise InputError("this bundle has no image encoder; send text only, or build a bundle from a "
                                 "multimodal recipe")
            positions = [i for i, t in enumerate(tokens) if t == token_id]
            blocks = [encoder.n_blocks(im) for im in images] if getattr(encoder, "sliced", False) else []
            if len(positions) != (sum(blocks) if blocks else len(images)):
                raise InputError(f"the chat template placed {len(positions)} image markers for {len(images)} images")
            prompt.images, prompt.image_positions, prompt.tokens_per_image = images, positions, encoder.n_tokens
            prompt.blocks_per_image = blocks
        if clips:
            if not self.pipeline.audio_embeds:
                raise InputError("this bundle's LLM takes no audio rows; audio parts are transcribed by `ask`")
            positions = [i for i, t in enumerate(tokens) if t == self.pipeline.audio_token_id]
            if len(positions) != len(clips):
                raise InputError(f"the chat template placed {len(positions)} audio markers for {len(clips)} clips")
            prompt.audio, prompt.audio_positions = clips, positions
            prompt.tokens_per_audio = self.pipeline.encoders["audio"].n_tokens
        return prompt

    def prompt_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        prompt = render_chat(
            self.pipeline.chat_template,
            [self._for_template(m) for m in messages],
            bos_token=_special_text(self.llm, "bos"),
            eos_token=_special_text(self.llm, "eos"),
        )
        split = self.pipeline.image_split_text
        encoder = self.pipeline.encoders.get("image")
        if split is not None and getattr(encoder, "sliced", False):
            tokens = self._sliced_tokens(prompt, split, encoder, messages)
        elif split is None:
            tokens = self._tokenize(prompt, add_special=True)
        else:
            first, *rest = prompt.split(split)
            tokens = self._tokenize(first, add_special=True)
            for chunk in rest:
                tokens += [IMAGE_SENTINEL] + (self._tokenize(chunk, add_special=False) if chunk else [])
        bos = self.llm.special_token("bos")
        if len(tokens) > 1 and bos is not None and tokens[0] == tokens[1] == bos[0]:
            tokens = tokens[1:]  # the template wrote BOS and the tokenizer added another
        return tokens

    def _sliced_tokens(self, prompt: str, marker: str, encoder: Any, messages: list[dict[str, Any]]) -> list[int]:
        """MiniCPM-V: each image's marker becomes its placeholder text (overview + slices, with their
        `<image>`/`<slice>` marks), and the text is tokenized piece by piece between the runs of unk
        tokens, as OpenBMB's processor bounds them; a sentinel stands for each run (one block of rows)."""
        images = [p["pixels"] for m in messages if isinstance(m["content"], list) for p in m["content"]
                  if p.get("type") == "image"]
        first, *rest = prompt.split(marker)
        if len(rest) != len(images):
            raise InputError(f"the chat template placed {len(rest)} image markers for {len(images)} images")
        text = first + "".join(encoder.placeholder(im, i) + chunk for i, (im, chunk) in enumerate(zip(images, rest)))
        head, *pieces = text.split(encoder.slices.unk * encoder.slices.query_num)
        tokens = self._tokenize(head, add_special=True)
        for piece in pieces:
            tokens += [IMAGE_SENTINEL] + (self._tokenize(piece, add_special=False) if piece else [])
        return tokens

    def _protect(self, text: str) -> str:
        """A message's text as the template gets it: text that holds a control token's string
        (`<|im_end|>` typed by a user) is wrapped in private-use marks, and `_tokenize` reads
        it as plain text; the template's own markers, outside the marks, stay control tokens.
        Other text is left alone, so it is tokenized exactly as before (one call, no seams)."""
        if not any(s in text for s in self.llm.special_texts()):
            return text
        return PROTECT_OPEN + text.replace(PROTECT_OPEN, "").replace(PROTECT_CLOSE, "") + PROTECT_CLOSE

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        if PROTECT_OPEN not in text:
            return self.llm.tokenize(text, add_special=add_special, parse_special=True)
        tokens: list[int] = []
        for i, piece in enumerate(_PROTECTED.split(text)):  # outside, inside, outside, ...
            if piece or (i == 0 and add_special):
                tokens += self.llm.tokenize(piece, add_special=add_special and i == 0, parse_special=i % 2 == 0)
        return tokens

    def _for_template(self, message: dict[str, Any]) -> dict[str, Any]:
        """What the template sees: no pixels, and parts or a string as the template expects."""
        content = message["content"]
        if isinstance(content, str):
            content = self._protect(content)
            message = {**message, "content": content}
        if isinstance(content, list):
            parts = [{"type": p["type"]} if p.get("type") in ("image", "audio")
                     else {**p, "text": self._protect(p.get("text", ""))} for p in content]
            if self.pipeline.structured_content:
                return {**message, "content": parts}
            return {**message, "content": "".join(p.get("text", "") for p in parts)}
        if self.pipeline.structured_content:
            return {**message, "content": [{"type": "text", "text": content}]}
        return message

    def begin(self, messages: list[dict[str, Any]], heard: list[str] | None = None,
              transcribe_s: float = 0.0) -> Turn:
        """Everything before the prefill: the prompt as segments (images encoded), the adapter
        applied, and the reply's text state. The engine's slots and `generate` share it."""
        start = time.perf_counter()
        prompt = self.prompt(messages)
        stats = GenerationStats(prompt_tokens=prompt.size, images=len(prompt.images), audio_clips=len(prompt.audio),
                                heard=list(heard or []), transcribe_s=transcribe_s)
        self.last_stats = stats
        if prompt.size >= self.llm.n_ctx:  # before encoding images that cannot fit anyway
            raise ContextOverflowError(
                f"the prompt is {prompt.size} tokens but the context holds {self.llm.n_ctx}; "
                "shorten it (fewer images) or load the bundle with a larger context"
            )
        self.pipeline.use_adapter(self.adapter)  # a change empties the KV cache (no prefix mixes adapters)
        segments: list[Segment] = [TokenSegment(prompt.tokens)]
        if prompt.images or prompt.audio:
            t = time.perf_counter()
            segments = prompt.segments(self.pipeline.encode_images(prompt.images) if prompt.images else [],
                                       self.pipeline.encode_audio(prompt.audio) if prompt.audio else [])
            stats.encode_s = time.perf_counter() - t
        budget = min(self.max_tokens, self.llm.n_ctx - prompt.size)
        return Turn(segments, ReplyText(self.llm, self.stop, stats, start, budget))

    def generate(self, messages: list[dict[str, Any]], cancelled: Callable[[], bool] | None = None,
                 heard: list[str] | None = None, transcribe_s: float = 0.0) -> Iterator[str]:
        """Stream the assistant's reply to `messages` (not recorded in the session).

        `cancelled` is polled during the prefill and after every token, also while text is
        held back as a possible stop string: when it turns true the reply ends
        (finish_reason "cancelled") without waiting for the next piece of text.
        """
        cancelled = cancelled or (lambda: False)
        turn = self.begin(messages, heard, transcribe_s)
        reply = turn.reply
        try:
            self.llm.prefill(turn.segments, abort=cancelled)
        except Cancelled:
            reply.end("cancelled")
            return
        reply.prefilled()
        if self.speculative is not None:
            counts = SpeculativeCounts()
            reply.stats.speculative = self.speculative.options.mode
            tokens = self.speculative.stream(self.llm, self.sampling, reply.budget, counts)
        else:
            counts, tokens = None, self.llm.stream(self.sampling, reply.budget)
        with closing(tokens):  # a reply cut short leaves the KV cache as plain decoding leaves it
            for tok in tokens:
                if counts is not None:
                    reply.stats.drafted_tokens, reply.stats.accepted_tokens = counts.drafted, counts.accepted
                out, stopped = reply.push(tok)
                if cancelled():
                    reply.end("cancelled")
                    return
                if out:
                    yield out
                if stopped:
                    reply.end("stop")
                    return
        if counts is not None:
            reply.stats.drafted_tokens, reply.stats.accepted_tokens = counts.drafted, counts.accepted
        # the stream ended on an end-of-generation token, or at the budget
        tail = reply.end("stop" if reply.stats.completion_tokens < reply.budget else "length")
        if tail:
            yield tail


@dataclass
class Turn:
    """A reply about to be generated: the prompt's segments and the reply's text state."""

    segments: list[Segment]
    reply: ReplyText


class ReplyText:
    """Generated tokens in, text out: incremental detokenizing, stop strings held back until
    they are known not to match, and the reply's timing in its `GenerationStats`."""

    def __init__(self, llm: LLMBackend, stop: list[str], stats: GenerationStats, start: float, budget: int):
        self.stats = stats
        self.budget = budget  # tokens the reply may take: max_tokens, or less where the context ends
        self._stop = stop
        self._start = start
        self._detok = Detokenizer(llm)
        self._held = ""  # text that might be the start of a stop string
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None

    def prefilled(self) -> None:
        self.stats.prefill_s = time.perf_counter() - self._start

    def push(self, token: int) -> tuple[str, bool]:
        """A generated token: (text safe to show now, whether a stop string ended the reply)."""
        self.stats.completion_tokens += 1
        self._last_token_at = time.perf_counter()
        if self._first_token_at is None:
            self._first_token_at = self._last_token_at
        out, self._held, stopped = _split_stop(self._held + self._detok.push(token), self._stop)
        if out and self.stats.ttft_s == 0.0:
            self.stats.ttft_s = time.perf_counter() - self._start
        return out, stopped

    def end(self, reason: str) -> str:
        """Finish with `reason` (stop | length | cancelled); returns the text still held back
        (none when cancelled or cut at a stop string)."""
        self.stats.finish_reason = reason
        tail = ""
        if reason != "cancelled":  # after a stop string nothing is held: it was cut with the string
            tail = self._held + self._detok.flush()
        self._held = ""
        if reason == "cancelled" and self._first_token_at is None:
            return ""  # a prefill that was stopped: no timing to report
        if self._first_token_at is not None and self._last_token_at is not None:
            self.stats.decode_s = self._last_token_at - self._first_token_at
        if self.stats.ttft_s == 0.0:
            self.stats.ttft_s = time.perf_counter() - self._start
        return tail


def _split_stop(text: str, stops: list[str]) -> tuple[str, str, bool]:
    """Split `text` into (safe to emit, held back, stop found); the earliest stop in the text wins."""
    if not stops:
        return text, "", False
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    if found:
        return text[: min(found)], "", True
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return text[: len(text) - keep], text[len(text) - keep :], False


def _special_text(llm: LLMBackend, kind: str) -> str:
    special = llm.special_token(kind)
    return special[1] if special else ""
