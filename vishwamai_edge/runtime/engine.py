"""The shared engine under `ui` and `serve`: one loaded model, one worker, a bounded queue.

One thread owns the model. With the llama.cpp backend it decodes up to `parallel` requests
together (continuous batching, `slots.py`): a waiting request takes a slot as soon as one is
free, between two decode steps; a backend without several sequences runs one at a time.
Every front end submits `ChatRequest`s and reads a `Generation`,
a thread-safe stream of text pieces that a thread or an asyncio task can consume
and any thread can cancel (the stop button, a client that went away).

Requests carry messages made of parts (text, image, audio; decoded by `media`, within
the budget `media_budget()` gives: only kinds this bundle has an encoder for).
A cancelled request leaves the queue at once; a running one stops within a decode
step, also in the middle of a long prefill. If the worker thread dies, every waiting
reader gets an `EngineFailedError` (a 500) instead of waiting for ever.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..errors import ContextOverflowError, InputError, UserError
from .backends import SamplingParams, SupportsSlots
from .constrained import Grammar
from .generation_stats import GenerationStats
from .manifest import RuntimeDefaults
from .media import AudioPart, ImagePart, MediaBudget, Part, TextPart
from .options import RuntimeOptions
from .pipeline import Pipeline
from .reply import ReplyText
from .session import ChatSession
from .slots import Job, SlotDecoder
from .tools import Choice, Tool, ToolCall, ToolUse

log = logging.getLogger(__name__)


class EngineBusyError(UserError):
    """The wait queue is full; the caller may retry later."""


class EngineClosedError(UserError):
    """The engine is shutting down."""


class EngineFailedError(RuntimeError):
    """The worker thread died: a bug, answered as a server error, never a wait without end."""


# A conversation is bounded before it is rendered or tokenized, in the caller's thread: no token of
# a vocabulary we ship spans more than this many characters (SmolLM2's longest: 81), so longer text
# cannot fit the context anyway, and every message costs at least one token. What passes tokenizes
# in well under a second (2048-token context: 262 k characters of `<|im_end|>` as text, 0.3 s).
MAX_CHARS_PER_TOKEN = 128

# -- request ------------------------------------------------------------------------------
Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class Message:
    role: Role
    parts: tuple[Part, ...]
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call whose result it is

    @classmethod
    def text(cls, role: Role, text: str) -> Message:
        return cls(role, (TextPart(text),))


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    # Drop the oldest exchanges when the conversation outgrows the context (a chat page's
    # history); off for the API, where the client owns the history and gets a 400 instead.
    trim_history: bool = False
    adapter: str | None = None  # a LoRA adapter of the bundle to answer with (None: the base model)
    grammar: Grammar | None = None  # the reply is JSON valid under this schema (`Engine.compile_schema`)
    tools: ToolUse | None = None  # functions the model may call (`Engine.tool_use`); its grammar wins


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
        self._on_cancel: Callable[[Generation], None] | None = None  # the engine drops it from its queue
        self.heard: list[str] = []  # transcripts of the request's audio parts, once the worker has them

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
        """Stop generating (idempotent); a queued request leaves the queue at once."""
        if self._cancel.is_set():
            return
        self._cancel.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

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
    """One pipeline, one worker thread, `parallel` slots decoded together, and a wait queue
    of at most `max_queue` requests in front of them."""

    def __init__(self, pipeline: Pipeline, max_queue: int = 16):
        if max_queue < 1:
            raise UserError("the wait queue must hold at least one request (max_queue >= 1)")
        self.pipeline = pipeline
        self.max_queue = max_queue
        self.model_id: str = pipeline.bundle.name
        self.n_ctx: int = pipeline.llm.n_ctx
        self.defaults: RuntimeDefaults = pipeline.bundle.runtime_defaults
        # read once here: the worker owns the backend from now on
        self._model_bytes = pipeline.llm.memory().model_bytes
        self._pending: deque[Generation] = deque()
        self._cond = threading.Condition()
        self._running: set[Generation] = set()
        # a backend with several sequences decodes its requests together; others, and speculative
        # decoding (several tokens of one reply per step instead), one at a time
        batched = isinstance(pipeline.llm, SupportsSlots) and pipeline.speculative is None
        self._slots: SlotDecoder | None = SlotDecoder(pipeline.llm) if batched else None
        self.parallel: int = self._slots.n_slots if self._slots else 1
        self.speculative: str = pipeline.speculative.options.mode if pipeline.speculative else "off"
        self._batch_adapter: str | None = None  # the LoRA adapter of the requests in the slots
        self._closed = False
        self._failure: BaseException | None = None  # why the worker died, if it did
        self.served = 0  # requests finished (answered, cancelled or failed)
        self.cancelled = 0
        self._worker = threading.Thread(target=self._work, name="vishwamai-engine", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, bundle: Path | str, options: RuntimeOptions | None = None, max_queue: int = 16) -> Engine:
        """The bundle loaded with `options` (default: the bundle's own settings, its target's slots), its
        requests decoded together in the slots, `max_queue` more waiting."""
        return cls(Pipeline.load(bundle, options or RuntimeOptions(parallel=None)), max_queue=max_queue)

    @property
    def encoders(self) -> dict[str, Any]:
        # Filled by multimodal bundles (kind -> encoder); text-only bundles have none.
        return getattr(self.pipeline, "encoders", None) or {}

    def media_budget(self) -> MediaBudget:
        """A fresh budget for decoding one request's media: only kinds this bundle can encode."""
        return MediaBudget(accepts=frozenset(self.encoders))

    def submit(self, request: ChatRequest) -> Generation:
        """Check the request and queue it; raises InputError / EngineBusyError at once."""
        request = self._bounded(request)
        self._check(request)
        gen = Generation(request)
        with self._cond:
            self._check_room()
            gen._on_cancel = self._drop
            self._pending.append(gen)
            self._cond.notify()
        return gen

    def check_room(self) -> None:
        """Raise now if a request submitted now would be refused: a front end calls this before it
        decodes a request's images or audio, so a full queue costs no decoding."""
        with self._cond:
            self._check_room()

    def _check_room(self) -> None:  # the caller holds the lock
        if self._failure is not None:
            raise EngineFailedError(f"the model worker has stopped ({type(self._failure).__name__})")
        if self._closed:
            raise EngineClosedError("the model server is shutting down")
        if len(self._pending) >= self.max_queue:
            raise EngineBusyError(f"the model is busy: {len(self._pending)} requests are already waiting; retry shortly")

    def _drop(self, gen: Generation) -> None:
        """A cancelled request that has not started frees its place in the queue now."""
        with self._cond:
            try:
                self._pending.remove(gen)
            except ValueError:
                return  # running or finished: the worker sees the flag
            self.served += 1
            self.cancelled += 1
        gen._push(_DONE, RequestStats(GenerationStats(finish_reason="cancelled"), cancelled=True,
                                      queue_wait_s=time.perf_counter() - gen.submitted_at))

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {"waiting": len(self._pending), "running": len(self._running), "parallel": self.parallel,
                    "speculative": self.speculative,
                    "served": self.served, "cancelled": self.cancelled, "max_queue": self.max_queue}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            for gen in list(self._running):
                gen.cancel()
            self._cond.notify_all()
        for gen in pending:
            gen._push(_ERROR, EngineClosedError("the model server is shutting down"))
        self._worker.join()
        self.pipeline.close()

    def compile_schema(self, schema: dict[str, Any] | None, where: str = "json_schema") -> Grammar:
        """A response format's schema as a grammar for `ChatRequest.grammar` (see Pipeline.compile_schema)."""
        return self.pipeline.compile_schema(schema, where)

    def tool_use(self, tools: list[Tool] | tuple[Tool, ...], choice: Choice = "auto", parallel: bool = True,
                 text_schema: dict[str, Any] | None = None, text_json: bool = False) -> ToolUse:
        """Functions offered to the model for `ChatRequest.tools` (see Pipeline.tool_use)."""
        return self.pipeline.tool_use(tools, choice, parallel, text_schema, text_json)

    @property
    def model_ids(self) -> dict[str, str | None]:
        """What requests may name as `model`: the bundle, and `<bundle>:<adapter>` per LoRA adapter."""
        return {self.model_id: None, **{f"{self.model_id}:{name}": name for name in self.pipeline.adapters}}

    def _check(self, request: ChatRequest) -> None:
        if not request.messages:
            raise InputError("the conversation has no messages")
        self.pipeline.check_adapter(request.adapter)
        if request.max_tokens < 1:
            raise InputError("max_tokens must be at least 1")
        budget = self.media_budget()
        for msg in request.messages:
            if msg.role not in ("system", "user", "assistant", "tool"):
                raise InputError(f"unknown message role {msg.role!r} (system, user, assistant or tool)")
            for part in msg.parts:
                if isinstance(part, ImagePart):
                    budget.require("image")
                    budget.charge_pixels(part.pixels.shape[1], part.pixels.shape[0])
                elif isinstance(part, AudioPart):
                    budget.require("audio")
                    budget.charge_seconds(part.samples.size / part.sample_rate)

    def _bounded(self, request: ChatRequest) -> ChatRequest:
        """The request within the size any prompt of this context can have: the oldest messages
        dropped when it may trim its history, else refused (ContextOverflowError) before any work."""
        max_chars, max_messages = self.n_ctx * MAX_CHARS_PER_TOKEN, self.n_ctx

        def chars(m: Message) -> int:
            return sum(len(p.text) for p in m.parts if isinstance(p, TextPart))

        messages, total = list(request.messages), sum(chars(m) for m in request.messages)
        if request.trim_history and (total > max_chars or len(messages) > max_messages):
            # newest first: system messages and the last one always stay, older ones while they fit
            keep, full = [m.role == "system" for m in messages], False
            total, count = sum(chars(m) for m, k in zip(messages, keep) if k), sum(keep)
            for i in reversed(range(len(messages))):
                if keep[i]:
                    continue
                c = chars(messages[i])
                if i == len(messages) - 1 or not full and total + c <= max_chars and count < max_messages:
                    keep[i], total, count = True, total + c, count + 1
                else:
                    full = True
            messages = [m for m, k in zip(messages, keep) if k]
        if total > max_chars:
            raise ContextOverflowError(f"the conversation is {total} characters; no more than {max_chars} fit the "
                                       f"context of {self.n_ctx} tokens")
        if len(messages) > max_messages:
            raise ContextOverflowError(f"the conversation has {len(messages)} messages; no more than {max_messages} "
                                       f"fit the context of {self.n_ctx} tokens")
        return request if len(messages) == len(request.messages) else replace(request, messages=tuple(messages))

    def _session_messages(self, request: ChatRequest) -> tuple[list[dict[str, Any]], list[str]]:
        """Engine messages -> the session's (a string, or parts when a message carries images or audio
        the LLM hears itself), other audio parts heard as text; also returns what was heard."""
        out, heard = [], []
        for m in request.messages:
            parts: list[dict[str, Any]] = []
            for p in m.parts:
                if isinstance(p, ImagePart):
                    parts.append({"type": "image", "pixels": p.pixels})
                elif isinstance(p, AudioPart) and self.pipeline.audio_embeds:  # the LLM hears it itself
                    parts.append({"type": "audio", "samples": p.samples, "rate": p.sample_rate})
                elif isinstance(p, AudioPart):
                    heard.append(self.pipeline.transcribe(p.samples, p.sample_rate))
                    parts.append({"type": "text", "text": heard[-1]})
                else:
                    parts.append({"type": "text", "text": p.text})
            if any(p["type"] in ("image", "audio") for p in parts):
                message: dict[str, Any] = {"role": m.role, "content": parts}
            else:
                message = {"role": m.role, "content": " ".join(p["text"] for p in parts if p["text"])}
            if m.tool_calls:
                message["tool_calls"] = list(m.tool_calls)
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            out.append(message)
        return out, heard

    # worker side
    def _work(self) -> None:
        try:
            if self._slots is None:
                self._work_alone()
            else:
                self._work_batched(self._slots)
        except BaseException as exc:  # the worker is dying: nobody may wait for it
            log.exception("the engine's worker thread died")
            self._fail_all(exc)
            raise

    def _work_alone(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                gen = self._pending.popleft()
                self._running.add(gen)
            self._run(gen)

    def _work_batched(self, slots: SlotDecoder) -> None:
        while True:
            with self._cond:
                while not self._pending and not slots.jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    slots.cancel_all()
                    return
                admitted = self._admit(slots.free, busy=bool(slots.jobs))
                self._running.update(admitted)
            for gen in admitted:
                self._start(gen, slots)
            slots.step()

    def _admit(self, free: int, busy: bool) -> list[Generation]:
        """Waiting requests that may take a slot now, in order (the caller holds the lock). One
        LoRA adapter applies to the whole context: a request for another waits until the
        slots have drained, and so does everything behind it (first come, first served)."""
        out: list[Generation] = []
        while self._pending and len(out) < free:
            adapter = self._pending[0].request.adapter
            if (busy or out) and adapter != self._batch_adapter:
                break
            self._batch_adapter = adapter
            out.append(self._pending.popleft())
        return out

    def _finished(self, gen: Generation, cancelled: bool) -> None:
        with self._cond:
            self._running.discard(gen)
            self.served += 1
            self.cancelled += cancelled

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            self._failure = exc
            running, self._running = list(self._running), set()
            waiting, self._pending = list(self._pending), deque()
        error = EngineFailedError(f"the model worker has stopped ({type(exc).__name__})")
        for gen in [*running, *waiting]:
            gen._push(_ERROR, error)

    def _session(self, gen: Generation) -> tuple[ChatSession, RequestStats]:
        req = gen.request
        session = ChatSession(self.pipeline, sampling=req.sampling, max_tokens=req.max_tokens, stop=list(req.stop),
                              adapter=req.adapter, grammar=req.grammar, tools=req.tools)
        return session, RequestStats(session.last_stats, queue_wait_s=time.perf_counter() - gen.submitted_at,
                                     model_bytes=self._model_bytes)

    def _prepare(self, gen: Generation, session: ChatSession) -> tuple[list[dict[str, Any]], float, int]:
        """The request's messages for the session (audio heard, history trimmed if asked)."""
        t = time.perf_counter()
        messages, heard = self._session_messages(gen.request)
        gen.heard = heard  # set before the first piece: a front end can show it with the reply
        transcribe_s, dropped = time.perf_counter() - t, 0
        if gen.request.trim_history:
            messages, dropped = session.fit_history(messages)
        return messages, transcribe_s, dropped

    def _done(self, gen: Generation, stats: RequestStats) -> None:
        import psutil

        stats.cancelled = gen.cancelled
        stats.rss_bytes = psutil.Process().memory_info().rss
        gen._push(_DONE, stats)
        self._finished(gen, stats.cancelled)

    def _fail(self, gen: Generation, exc: Exception) -> None:
        if not isinstance(exc, UserError):  # a bug; the worker lives on for the next request
            log.error("generation failed", exc_info=exc)
        gen._push(_ERROR, exc)  # user errors: context overflow, a template that refuses the conversation
        self._finished(gen, False)

    def _start(self, gen: Generation, slots: SlotDecoder) -> None:
        """Put a request into a slot: its prompt is evaluated by the next steps."""
        session, stats = self._session(gen)
        if gen.cancelled:
            self._done(gen, stats)
            return
        try:
            messages, transcribe_s, dropped = self._prepare(gen, session)
            turn = session.begin(messages, heard=gen.heard, transcribe_s=transcribe_s)
            turn.reply.stats.dropped_messages = dropped
            stats.generation = turn.reply.stats

            def done(reply: ReplyText) -> None:
                stats.generation = reply.stats
                self._done(gen, stats)

            slots.add(Job(turn, gen.request.sampling, cancelled=lambda: gen.cancelled,
                          emit=lambda piece: gen._push(_TEXT, piece), done=done, fail=lambda exc: self._fail(gen, exc)))
        except Exception as exc:
            self._fail(gen, exc)

    def _run(self, gen: Generation) -> None:
        """Generate one reply into `gen`, all of it (a backend of one sequence)."""
        session, stats = self._session(gen)
        try:
            if not gen.cancelled:
                messages, transcribe_s, dropped = self._prepare(gen, session)
                with closing(session.generate(messages, cancelled=lambda: gen.cancelled, heard=gen.heard,
                                              transcribe_s=transcribe_s)) as pieces:
                    for piece in pieces:
                        gen._push(_TEXT, piece)
                stats.generation = session.last_stats
                stats.generation.dropped_messages = dropped
        except Exception as exc:
            self._fail(gen, exc)
            return
        self._done(gen, stats)


__all__ = [
    "ChatRequest", "Engine", "EngineBusyError", "EngineClosedError", "EngineFailedError",
    "Generation", "Message", "RequestStats",
]
