"""Continuous batching: the replies of several requests decoded together in one context.

Each running reply owns a slot, one sequence of the llama.cpp context. Every `step` evaluates
the next chunk of one waiting prompt, then makes one `llama_decode` of the next token of every
decoding slot, so a request joins between two decode steps without waiting for the others to
finish. A slot keeps what it evaluated after
its reply ends: the next request whose prompt shares a prefix with it is given that slot
and skips the shared part. Each slot has its own sampler, stop strings and cancellation.

Why greedy replies do not change with the company they keep: each sequence has its own KV
cells (a non-unified cache), and the rows of a batch are computed independently, so the
logits of one row do not depend on the others (tests/serve/test_batching.py checks it token
for token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .backends import Cancelled, EmbeddingSegment, SamplingParams, Segment, TokenSegment
from .backends.llamacpp import prompt_keys
from .constrained import GrammarError
from .reply import ReplyText
from .session import Turn


@dataclass
class Job:
    """One reply being produced in a slot."""

    turn: Turn
    sampling: SamplingParams
    cancelled: Callable[[], bool]
    emit: Callable[[str], None]  # a piece of text
    done: Callable[[ReplyText], None]  # called once, when the reply has ended (stats in it)
    fail: Callable[[Exception], None]  # or this, once, when the reply cannot go on (its grammar failed)
    pending: list[Segment] = field(default_factory=list)  # prompt segments still to evaluate
    next_token: int | None = None  # sampled and shown, to be evaluated by the next step
    sampler: Any = None

    @property
    def reply(self) -> ReplyText:
        return self.turn.reply


class SlotDecoder:
    """The slots of one multi-sequence backend (`n_seq` of them) and the loop step that
    advances all of them. Single-threaded: the engine's worker calls every method."""

    def __init__(self, llm: Any):
        self.llm = llm
        self.jobs: dict[int, Job] = {}  # seq -> the job running in it

    @property
    def n_slots(self) -> int:
        return int(self.llm.n_seq)

    @property
    def free(self) -> int:
        return self.n_slots - len(self.jobs)

    def add(self, job: Job) -> int:
        """Put `job` in the free slot that already holds the longest prefix of its prompt."""
        keys = prompt_keys(job.turn.segments)
        free = [s for s in range(self.n_slots) if s not in self.jobs]
        if not free:
            raise RuntimeError("no free slot")  # the engine admits no more than `free`
        seq = max(free, key=lambda s: (self.llm.shared_prefix(keys, s), -s))
        job.pending = self.llm.start(job.turn.segments, seq)
        self.jobs[seq] = job
        return seq

    def step(self) -> None:
        """Drop cancelled replies; evaluate the next piece of one waiting prompt (a call of its
        own), then one decode call with the next token of every decoding slot."""
        for seq, job in list(self.jobs.items()):
            if job.cancelled():
                self._finish(seq, "cancelled")
        prompt = next(((seq, job) for seq, job in self.jobs.items() if job.pending), None)
        if prompt is not None:
            self._prefill_chunk(*prompt)
        items = [(seq, [job.next_token], True) for seq, job in self.jobs.items() if job.next_token is not None]
        if not items:
            return
        seqs = [seq for seq, _, _ in items]
        try:
            rows = self.llm.decode(items, abort=lambda: all(self.jobs[s].cancelled() for s in seqs))
        except Cancelled:
            return  # every slot in the call was cancelled; the next step finishes them
        for seq, (row,) in rows.items():
            self._sample(seq, self.jobs[seq], row)

    def _prefill_chunk(self, seq: int, job: Job) -> None:
        """Up to `n_batch` positions of `job`'s prompt, alone in the call: the prompt is cut into
        the same batches as when it runs by itself, so its logits are the same to the last bit
        (prompts batched together, or with decode tokens, come out a little different)."""
        head = job.pending[0]
        try:
            if isinstance(head, EmbeddingSegment):
                self.llm.decode_embeddings(seq, head.embeddings, len(job.pending) == 1, abort=job.cancelled)
                job.pending.pop(0)
            else:
                tokens = list(head.tokens)
                take, rest = tokens[: self.llm.n_batch], tokens[self.llm.n_batch :]
                if rest:
                    job.pending[0] = TokenSegment(rest)
                else:
                    job.pending.pop(0)
                self.llm.decode([(seq, take, not job.pending)], abort=job.cancelled)
        except Cancelled:
            return  # the next step finishes it
        if not job.pending:
            self._sample(seq, job, -1)

    def _sample(self, seq: int, job: Job, row: int) -> None:
        reply = job.reply
        if job.sampler is None:  # the prompt is in: penalties start from its tokens
            reply.prefilled()
            job.sampler = self.llm.sampler(job.sampling, seq)
        if self.llm.n_past_of(seq) >= self.llm.n_ctx:
            self._finish(seq, "length")
            return
        try:
            tok = self.llm.sample(job.sampler, row, job.turn.grammar)  # each slot its own grammar state
        except GrammarError as exc:  # this reply ends; the other slots go on
            self.jobs.pop(seq)
            self.llm.free_sampler(job.sampler)
            job.fail(exc)
            return
        if self.llm.is_eog(tok):
            self._finish(seq, "stop")
            return
        out, stopped = reply.push(tok)
        if job.cancelled():
            self._finish(seq, "cancelled")
            return
        if out:
            job.emit(out)
        if stopped:
            self._finish(seq, "stop")
        elif reply.stats.completion_tokens >= reply.budget:
            self._finish(seq, "length")
        else:
            job.next_token = tok

    def _finish(self, seq: int, reason: str) -> None:
        job = self.jobs.pop(seq)  # what the slot evaluated stays: a prefix for the next prompt
        if job.sampler is not None:
            self.llm.free_sampler(job.sampler)
        tail = job.reply.end(reason)
        if tail:
            job.emit(tail)
        job.done(job.reply)

    def cancel_all(self, reason: str = "cancelled") -> None:
        for seq in list(self.jobs):
            self._finish(seq, reason)
