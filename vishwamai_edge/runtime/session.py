"""Chat on a loaded pipeline (runtime/pipeline.py): the conversation, its history fitted to the context,
the prefill, and the reply streamed and incrementally detokenized.

Messages are `{"role", "content"}` dicts; content is a string, or a list of parts
`{"type": "text", "text": ...}`, `{"type": "image", "pixels": (H, W, 3) uint8}` and, for
bundles whose audio encoder feeds the LLM (manifest `encoders.audio.mode` embeddings),
`{"type": "audio", "samples": (n,) float32, "rate": Hz}`. The bundle's prompt planner
(runtime/prompts) places each image's encoder rows in the prompt as embedding segments, so an
image takes its rows' positions of the context and is never part of a reused KV prefix. Other
bundles with an audio encoder transcribe audio first and send the text (the speech-to-text cascade).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ContextOverflowError, InputError
from .backends import Cancelled, SamplingParams, Segment, TokenSegment
from .generation_stats import GenerationStats
from .prompts import Prompt
from .reply import ReplyText
from .speculative import SpeculativeCounts, Speculator

if TYPE_CHECKING:
    from .constrained import Grammar, GrammarState
    from .pipeline import Pipeline
    from .tools import ToolUse


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
        grammar: Grammar | None = None,
        tools: ToolUse | None = None,
    ):
        """`speculative`: True, the pipeline's speculative decoding (if it has one); False, plain
        decoding; or a `Speculator` of the caller's (profile compares them on one pipeline).
        `grammar` (`pipeline.compile_schema(schema)`): every reply is JSON valid under that schema,
        decoded plainly (no speculation). `tools` (`pipeline.tool_use(...)`): the functions the model may
        call, offered in the prompt; its grammar (calls, text, or JSON under the schema) replaces `grammar`."""
        self.pipeline = pipeline
        self.llm = pipeline.llm
        self.speculative: Speculator | None = (pipeline.speculative if speculative is True
                                               else speculative or None)
        pipeline.check_adapter(adapter)
        self.adapter = adapter  # the LoRA adapter every reply of this conversation uses (None: the base)
        self.tools = tools
        self.grammar = tools.grammar if tools is not None else grammar
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
        return self.pipeline.prompts.build(messages, self.tools)

    def prompt_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.pipeline.prompts.tokens(messages, self.tools)

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
        grammar = self.grammar.start() if self.grammar is not None else None
        # with tools, a call may start with a control token (`[TOOL_CALLS]`): the reply shows it for the parser
        reply = ReplyText(self.llm, self.stop, stats, start, budget, special=self.tools is not None)
        return Turn(segments, reply, grammar)

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
        if self.speculative is not None and turn.grammar is None:  # drafts are not checked against a grammar
            counts = SpeculativeCounts()
            reply.stats.speculative = self.speculative.options.mode
            tokens = self.speculative.stream(self.llm, self.sampling, reply.budget, counts)
        else:
            counts, tokens = None, self.llm.stream(self.sampling, reply.budget, grammar=turn.grammar)
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
    grammar: GrammarState | None = None  # a constrained reply's position in its grammar
