"""The shared engine under `ui` and `serve`: one loaded model, one worker, a bounded queue.

llama.cpp's context holds one sequence, so one thread owns the model and runs one
request at a time; every front end submits `ChatRequest`s and reads a `Generation`,
a thread-safe stream of text pieces that a thread or an asyncio task can consume
and any thread can cancel (the stop button, a client that went away).

Requests carry messages made of parts (text, image, audio) so that encoders plug in
later: an image or audio part is decoded and checked here, then refused with a
clear message while the bundle has no encoder for it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np

from ..errors import ContextOverflowError, InputError, UserError, require
from .backends import SamplingParams
from .session import ChatSession, GenerationStats, Pipeline

log = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused before decoding (decompression bombs)
MAX_AUDIO_SECONDS = 600


class UnsupportedInputError(InputError):
    """An input kind (image, audio) the loaded bundle has no encoder for."""


class EngineBusyError(UserError):
    """The wait queue is full; the caller may retry later."""


class EngineClosedError(UserError):
    """The engine is shutting down."""


# -- request ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    pixels: np.ndarray  # (height, width, 3) uint8 RGB


@dataclass(frozen=True)
class AudioPart:
    samples: np.ndarray  # (n,) float32 mono in [-1, 1]
    sample_rate: int


Part = Union[TextPart, ImagePart, AudioPart]
Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    parts: tuple[Part, ...]

    @classmethod
    def text(cls, role: Role, text: str) -> Message:
        return cls(role, (TextPart(text),))


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()


def image_part(data: bytes) -> ImagePart:
    """Decode an encoded image (PNG, JPEG, WebP, ...) into RGB pixels, or raise InputError."""
    pil = require("PIL.Image", "ui")
    try:
        with pil.open(io.BytesIO(data)) as img:
            # the header alone gives the size: refuse huge images before decoding them
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise InputError(
                    f"the image is {img.width}x{img.height} pixels; the limit is {MAX_IMAGE_PIXELS // 1_000_000} megapixels"
                )
            pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except InputError:
        raise
    except pil.UnidentifiedImageError:
        raise InputError("the data is not an image in a format Pillow reads (PNG, JPEG, WebP, GIF, BMP, ...)") from None
    except Exception as exc:  # PIL raises many kinds for truncated or corrupt data
        raise InputError(f"the image cannot be decoded (truncated or corrupt: {exc})") from None
    return ImagePart(pixels)


def audio_part(data: bytes) -> AudioPart:
    """Decode WAV audio (or anything soundfile reads, when installed) into mono float32."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        samples, rate = _read_wav(data)
    else:
        try:
            import soundfile
        except ImportError:
            raise InputError("the audio is not a WAV file (other formats need the soundfile package)") from None
        try:
            samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as exc:
            raise InputError(f"the audio cannot be read ({exc})") from None
        samples = samples.mean(axis=1)
    if samples.size == 0:
        raise InputError("the audio is empty")
    if samples.size / rate > MAX_AUDIO_SECONDS:
        raise InputError(f"the audio is {samples.size / rate:.0f} s long; the limit is {MAX_AUDIO_SECONDS} s")
    return AudioPart(np.ascontiguousarray(samples, dtype=np.float32), int(rate))


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    import wave

    try:
        with wave.open(io.BytesIO(data)) as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise InputError(f"the WAV audio cannot be read ({exc})") from None
    if width == 1:
        x = (np.frombuffer(frames, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        x = np.frombuffer(frames, "<i2").astype(np.float32) / 32768
    elif width == 4:
        x = np.frombuffer(frames, "<i4").astype(np.float32) / 2147483648
    else:
        raise InputError(f"WAV audio of {width * 8}-bit samples is not supported (use 8, 16 or 32-bit PCM)")
    usable = len(x) - len(x) % channels
    return x[:usable].reshape(-1, channels).mean(axis=1), rate


def decode_data_url(url: str, kind: Literal["image", "audio"]) -> bytes:
    """`data:<mime>;base64,<payload>` -> bytes. The server never fetches http(s) URLs: it is offline."""
    if not url.startswith("data:"):
        raise InputError(f"only data: URLs are accepted for {kind}s (base64-encoded); this server fetches nothing")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise InputError(f"the {kind} data URL must look like data:{kind}/...;base64,<data>")
    mime = header[len("data:") : -len(";base64")]
    if mime and not mime.startswith(f"{kind}/"):
        raise InputError(f"the data URL holds {mime!r}, not an {kind}")
    return decode_base64(payload, kind)


def decode_base64(payload: str, what: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"the {what} data is not valid base64") from None


# -- stream -------------------------------------------------------------------------------
@dataclass
class RequestStats:
    generation: GenerationStats
    queue_wait_s: float = 0.0
    rss_bytes: int = 0  # the process after the request
    model_bytes: int = 0
    cancelled: bool = False

    @property
    def finish_reason(self) -> str:
        return "cancelled" if self.cancelled else self.generation.finish_reason


_TEXT, _DONE, _ERROR = "text", "done", "error"


class Generation:
    """One request's reply as it is produced. The engine's worker pushes; one reader consumes,
    either `for piece in gen` (blocking) or `async for piece in gen.astream()`."""

    def __init__(self, request: ChatRequest):
        self.request = request
        self.submitted_at = time.perf_counter()
        self.stats: RequestStats | None = None
        self._events: deque[tuple[str, Any]] = deque()
        self._cond = threading.Condition()
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancel = threading.Event()
        self._finished = False

    # worker side
    def _push(self, kind: str, value: Any) -> None:
        with self._cond:
            if self._finished:
                return
            self._finished = kind != _TEXT
            self._events.append((kind, value))
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, ready in wakers:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the reader's loop is gone
                pass

    # reader side
    def cancel(self) -> None:
        """Stop generating (idempotent; a queued request is dropped before it starts)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _take(self, wait: bool) -> tuple[str, Any] | None:
        with self._cond:
            while wait and not self._events:
                self._cond.wait()
            if not self._events:
                return None
            # the last event (done or error) stays: reading a finished generation again ends at once
            return self._events.popleft() if self._events[0][0] == _TEXT else self._events[0]

    def _handle(self, event: tuple[str, Any]) -> str | None:
        """A text piece, or None at the end (stats set); raises the request's error."""
        kind, value = event
        if kind == _TEXT:
            return value
        if kind == _ERROR:
            raise value
        self.stats = value
        return None

    def __iter__(self) -> Iterator[str]:
        while True:
            piece = self._handle(self._take(wait=True))
            if piece is None:
                return
            yield piece

    def text(self) -> str:
        return "".join(self)

    async def astream(self, idle_s: float | None = None) -> AsyncIterator[str | None]:
        """Pieces for an asyncio reader; with `idle_s`, None after each idle interval (for keep-alives)."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        with self._cond:
            self._wakers.append((loop, ready))
        try:
            while True:
                event = self._take(wait=False)
                if event is None:
                    try:
                        await asyncio.wait_for(ready.wait(), idle_s)
                    except asyncio.TimeoutError:
                        yield None
                    ready.clear()
                    continue
                piece = self._handle(event)
                if piece is None:
                    return
                yield piece
        finally:
            with self._cond:
                self._wakers.remove((loop, ready))


# -- engine -------------------------------------------------------------------------------
class Engine:
    """One pipeline, one worker thread, a wait queue of at most `max_queue` requests."""

    def __init__(self, pipeline: Pipeline, max_queue: int = 16):
        if max_queue < 1:
            raise UserError("the wait queue must hold at least one request (max_queue >= 1)")
        self.pipeline = pipeline
        self.max_queue = max_queue
        self.model_id: str = pipeline.bundle.name
        self.n_ctx: int = pipeline.llm.n_ctx
        self.defaults: dict[str, Any] = pipeline.bundle.runtime_defaults
        # read once here: the worker owns the backend from now on
        self._model_bytes = pipeline.llm.memory().model_bytes
        self._pending: deque[Generation] = deque()
        self._cond = threading.Condition()
        self._running: Generation | None = None
        self._closed = False
        self.served = 0  # requests finished (answered, cancelled or failed)
        self.cancelled = 0
        self._worker = threading.Thread(target=self._work, name="vishwamai-engine", daemon=True)
        self._worker.start()

    @classmethod
    def load(
        cls,
        bundle: Path | str,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        max_queue: int = 16,
    ) -> Engine:
        return cls(Pipeline.load(bundle, n_ctx=n_ctx, n_threads=n_threads), max_queue=max_queue)

    @property
    def encoders(self) -> dict[str, Any]:
        # Filled by multimodal bundles (kind -> encoder); text-only bundles have none.
        return getattr(self.pipeline, "encoders", None) or {}

    def submit(self, request: ChatRequest) -> Generation:
        """Check the request and queue it; raises InputError / EngineBusyError at once."""
        self._check(request)
        gen = Generation(request)
        with self._cond:
            if self._closed:
                raise EngineClosedError("the model server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise EngineBusyError(
                    f"the model is busy: {len(self._pending)} requests are already waiting; retry shortly"
                )
            self._pending.append(gen)
            self._cond.notify()
        return gen

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {"waiting": len(self._pending), "running": self._running is not None,
                    "served": self.served, "cancelled": self.cancelled, "max_queue": self.max_queue}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            if self._running is not None:
                self._running.cancel()
            self._cond.notify_all()
        for gen in pending:
            gen._push(_ERROR, EngineClosedError("the model server is shutting down"))
        self._worker.join()
        self.pipeline.close()

    def _check(self, request: ChatRequest) -> None:
        if not request.messages:
            raise InputError("the conversation has no messages")
        if request.max_tokens < 1:
            raise InputError("max_tokens must be at least 1")
        for msg in request.messages:
            if msg.role not in ("system", "user", "assistant"):
                raise InputError(f"unknown message role {msg.role!r} (system, user or assistant)")
            for part in msg.parts:
                kind = "image" if isinstance(part, ImagePart) else "audio" if isinstance(part, AudioPart) else None
                if kind and kind not in self.encoders:
                    raise UnsupportedInputError(
                        f"this bundle has no {kind} encoder; send text only, or build a bundle from a multimodal recipe"
                    )

    def _session_messages(self, request: ChatRequest) -> list[dict[str, Any]]:
        # Text-only until encoders land: their parts become embedding segments in the prompt.
        return [
            {"role": m.role, "content": "".join(p.text for p in m.parts if isinstance(p, TextPart))}
            for m in request.messages
        ]

    # worker side
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                gen = self._pending.popleft()
                self._running = gen
            cancelled = False
            try:
                cancelled = self._run(gen)
            finally:
                with self._cond:
                    self._running = None
                    self.served += 1
                    self.cancelled += cancelled

    def _run(self, gen: Generation) -> bool:
        """Generate one reply into `gen`; True if it was cancelled."""
        import psutil

        req = gen.request
        session = ChatSession(self.pipeline, sampling=req.sampling, max_tokens=req.max_tokens, stop=list(req.stop))
        stats = RequestStats(session.last_stats, queue_wait_s=time.perf_counter() - gen.submitted_at,
                             model_bytes=self._model_bytes)
        try:
            if not gen.cancelled:
                first_at = last_at = 0.0
                with closing(session.generate(self._session_messages(req))) as pieces:
                    for piece in pieces:
                        if gen.cancelled:
                            break
                        gen._push(_TEXT, piece)
                        last_at = time.perf_counter()
                        first_at = first_at or last_at
                stats.generation = g = session.last_stats
                if gen.cancelled and not g.decode_s:  # a closed generator never timed its decode
                    g.decode_s = last_at - first_at
        except UserError as exc:  # context overflow, a template that refuses the conversation
            gen._push(_ERROR, exc)
            return False
        except Exception as exc:  # a bug; the worker lives on for the next request
            log.exception("generation failed")
            gen._push(_ERROR, exc)
            return False
        stats.cancelled = gen.cancelled
        stats.rss_bytes = psutil.Process().memory_info().rss
        gen._push(_DONE, stats)
        return stats.cancelled


__all__ = [
    "AudioPart", "ChatRequest", "ContextOverflowError", "Engine", "EngineBusyError", "EngineClosedError",
    "Generation", "ImagePart", "Message", "Part", "RequestStats", "TextPart", "UnsupportedInputError",
    "audio_part", "decode_base64", "decode_data_url", "image_part",
]
