"""Chat on a loaded pipeline: template, prefill, streamed and incrementally detokenized text."""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .backends import Cancelled, LLMBackend, SamplingParams, Segment, TokenSegment, load_backend
from .bundle import Bundle
from .chat_template import CHATML_TEMPLATE, render_chat


DECODE_RATE_DEFINITION = (
    "decode tokens/s = (generated tokens - 1) / (time of the last generated token - time of the first): "
    "the first token comes from the prompt's logits, each later one costs one decode step"
)


def decode_tokens_per_s(tokens: int, first_to_last_s: float) -> float:
    """The one definition of decode speed used everywhere (see DECODE_RATE_DEFINITION)."""
    return (tokens - 1) / first_to_last_s if tokens > 1 and first_to_last_s > 0 else 0.0


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0  # prompt evaluation, including the first sampled token's logits
    ttft_s: float = 0.0  # request start -> first text out
    decode_s: float = 0.0  # first generated token -> last generated token
    finish_reason: str = "stop"  # stop | length | cancelled
    dropped_messages: int = 0  # oldest turns left out so that the conversation fits the context

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


class Pipeline:
    """A bundle loaded for inference: the LLM backend (and, with multimodal bundles, encoders)."""

    def __init__(self, bundle: Bundle, llm: LLMBackend):
        self.bundle = bundle
        self.llm = llm
        manifest_template = bundle.llm.get("chat_template")
        self.chat_template: str = manifest_template or llm.chat_template() or CHATML_TEMPLATE

    @classmethod
    def load(
        cls,
        path: Path | str,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        verify: bool = True,
    ) -> Pipeline:
        bundle = Bundle.load(path, verify=verify)
        defaults = bundle.runtime_defaults
        llm = load_backend(
            bundle.llm.get("backend", "llamacpp"),
            bundle.llm_path(),
            n_ctx=n_ctx or defaults.get("n_ctx", 2048),
            n_threads=n_threads,
        )
        return cls(bundle, llm)

    def session(self, **kwargs: Any) -> ChatSession:
        kwargs.setdefault("system_prompt", self.bundle.runtime_defaults.get("system_prompt"))
        return ChatSession(self, **kwargs)

    def close(self) -> None:
        self.llm.close()


class ChatSession:
    """A conversation. `ask` streams the reply to a user turn and records both turns."""

    def __init__(
        self,
        pipeline: Pipeline,
        system_prompt: str | None = None,
        sampling: SamplingParams | None = None,
        max_tokens: int = 512,
        stop: list[str] | None = None,
    ):
        self.pipeline = pipeline
        self.llm = pipeline.llm
        self.sampling = sampling or SamplingParams()
        self.max_tokens = max_tokens
        self.stop = list(stop or [])
        self.messages: list[dict[str, Any]] = []
        if system_prompt:
            self.messages.append({"role": "system", "content": system_prompt})
        self.last_stats = GenerationStats()

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]

    def ask(self, text: str) -> Iterator[str]:
        if not text.strip():
            raise InputError("the message is empty")
        self.messages.append({"role": "user", "content": text})
        self.messages, _ = self.fit_history(self.messages)
        reply: list[str] = []
        try:
            for piece in self.generate(self.messages):
                reply.append(piece)
                yield piece
        except BaseException:
            self.messages.pop()  # a failed turn leaves the conversation as it was
            raise
        self.messages.append({"role": "assistant", "content": "".join(reply)})

    def fit_history(self, messages: list[dict[str, Any]], reserve: int = 64) -> tuple[list[dict[str, Any]], int]:
        """Drop the oldest exchanges until the prompt leaves `reserve` tokens for the reply;
        returns the kept messages and how many were dropped. System messages always stay.

        A single message that does not fit is left alone: prefill reports it clearly.
        """
        messages = list(messages)
        dropped = 0
        while len(self.prompt_tokens(messages)) + reserve > self.llm.n_ctx:
            turns = [i for i, m in enumerate(messages) if m["role"] != "system"]
            if len(turns) <= 1:
                break
            first = turns[0]
            # an exchange is a user turn and the replies up to the next user turn
            end = next((i for i in turns[1:] if messages[i]["role"] == "user"), turns[-1])
            dropped += end - first
            del messages[first:end]
        return messages, dropped

    def prompt_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        prompt = render_chat(
            self.pipeline.chat_template,
            messages,
            bos_token=_special_text(self.llm, "bos"),
            eos_token=_special_text(self.llm, "eos"),
        )
        tokens = self.llm.tokenize(prompt, add_special=True, parse_special=True)
        bos = self.llm.special_token("bos")
        if len(tokens) > 1 and bos is not None and tokens[0] == tokens[1] == bos[0]:
            tokens = tokens[1:]  # the template wrote BOS and the tokenizer added another
        return tokens

    def generate(self, messages: list[dict[str, Any]], cancelled: Callable[[], bool] | None = None) -> Iterator[str]:
        """Stream the assistant's reply to `messages` (not recorded in the session).

        `cancelled` is polled during the prefill and after every token, also while text is
        held back as a possible stop string: when it turns true the reply ends
        (finish_reason "cancelled") without waiting for the next piece of text.
        """
        cancelled = cancelled or (lambda: False)
        start = time.perf_counter()
        tokens = self.prompt_tokens(messages)
        segments: list[Segment] = [TokenSegment(tokens)]
        stats = GenerationStats(prompt_tokens=len(tokens))
        self.last_stats = stats
        try:
            self.llm.prefill(segments, abort=cancelled)
        except Cancelled:
            stats.finish_reason = "cancelled"
            return
        stats.prefill_s = time.perf_counter() - start

        detok = Detokenizer(self.llm)
        held = ""  # text that might be the start of a stop string
        budget = min(self.max_tokens, self.llm.n_ctx - len(tokens))
        first_token_at = last_token_at = None
        stats.finish_reason = "length"
        for tok in self.llm.stream(self.sampling, budget):
            stats.completion_tokens += 1
            last_token_at = time.perf_counter()
            if first_token_at is None:
                first_token_at = last_token_at
            if cancelled():
                stats.finish_reason = "cancelled"
                break
            held += detok.push(tok)
            out, held, stopped = _split_stop(held, self.stop)
            if out:
                if stats.ttft_s == 0.0:
                    stats.ttft_s = time.perf_counter() - start
                yield out
            if stopped:
                stats.finish_reason = "stop"
                break
        else:
            if stats.completion_tokens < budget:
                stats.finish_reason = "stop"  # ended on an end-of-generation token
            held += detok.flush()
            if held:
                yield held
        if first_token_at is not None and last_token_at is not None:
            stats.decode_s = last_token_at - first_token_at
        if stats.ttft_s == 0.0:
            stats.ttft_s = time.perf_counter() - start


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
