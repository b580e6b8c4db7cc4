"""Generated tokens in, text out: incremental UTF-8 detokenizing, stop strings held back until they are known
not to match, and the reply's timing."""

from __future__ import annotations

import codecs
import time

from .backends import LLMBackend
from .generation_stats import GenerationStats


class Detokenizer:
    """Bytes of pieces in, complete UTF-8 text out: a multi-byte character split across
    tokens is held back until its last byte arrives."""

    def __init__(self, backend: LLMBackend, special: bool = False):
        self._backend = backend
        self._special = special  # control tokens as their text (a tool-call marker such as `[TOOL_CALLS]`)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        data = self._backend.token_bytes(token, special=True) if self._special else self._backend.token_bytes(token)
        return self._decoder.decode(data)

    def flush(self) -> str:
        """End of reply: a character cut off by the length limit is dropped, not shown as U+FFFD."""
        self._decoder.reset()
        return ""


class ReplyText:
    """Generated tokens in, text out: incremental detokenizing, stop strings held back until
    they are known not to match, and the reply's timing in its `GenerationStats`."""

    def __init__(self, llm: LLMBackend, stop: list[str], stats: GenerationStats, start: float, budget: int,
                 special: bool = False):
        self.stats = stats
        self.budget = budget  # tokens the reply may take: max_tokens, or less where the context ends
        self._stop = stop
        self._start = start
        self._detok = Detokenizer(llm, special)
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
        out, self._held, stopped = split_stop(self._held + self._detok.push(token), self._stop)
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


def split_stop(text: str, stops: list[str]) -> tuple[str, str, bool]:
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
