"""Continuous batching on the embedded model: replies decoded together equal the same requests
answered alone, token for token; cancelling or dropping one leaves the others alone; a freed slot
takes the next request; more slots than the context holds is a one-line error.

The shipped GGUF (Q4_1) is used as it is: its batched rows are bit-identical to single rows. The
Q4_K_M build of it is not, in this llama.cpp (0.3.36's): in a decode batch of 4 or more rows, the
4th row of every group of 4 comes out of the repacked CPU kernels up to about 1 logit away from the
same row alone (rows 1-3 exact), enough to change a greedy reply after a few tokens."""

from __future__ import annotations

import threading
import time

import pytest
from test_serve_cli import one_line_error, run_cli

from vishwamai_edge.errors import InputError
from vishwamai_edge.runtime.backends import SamplingParams
from vishwamai_edge.runtime.engine import ChatRequest, Engine, Message
from vishwamai_edge.runtime.options import RuntimeOptions
from vishwamai_edge.sources.embedded import embedded_gguf

pytestmark = pytest.mark.e2e

TOPICS = ["a dragon", "the sea", "a robot", "a lighthouse", "a baker", "the moon", "a fox", "a train"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def shipped_gguf():
    return embedded_gguf()


@pytest.fixture
def engine(shipped_gguf):
    """A fresh engine: every slot empty. llama.cpp's prompt logits differ in the last bits with the
    way a prompt is cut into batches, so both sides of a comparison start with nothing cached."""
    e = Engine.load(shipped_gguf, RuntimeOptions(n_threads=1, parallel=8, n_ctx=8 * 512))
    yield e
    e.close()


def story(topic: str, sampling: SamplingParams | None = None) -> ChatRequest:
    return ChatRequest((Message.text("user", f"Write a long story about {topic}."),), max_tokens=MAX_TOKENS,
                       sampling=sampling or SamplingParams())


def answer(gen, first: str = "") -> tuple[str, int, str]:
    text = first + gen.text()
    return text, gen.stats.generation.completion_tokens, gen.stats.finish_reason


class PeakRunning:
    """The most requests the engine ran at once while the block ran."""

    def __init__(self, engine: Engine):
        self.engine, self.peak, self._stop = engine, 0, threading.Event()

    def __enter__(self) -> PeakRunning:
        def watch():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.engine.status()["running"])
                time.sleep(0.005)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def answer_alone(bundle, request: ChatRequest) -> tuple[str, int, str]:
    """The request answered by a fresh engine with nothing else running."""
    e = Engine.load(bundle, RuntimeOptions(n_threads=1, parallel=8, n_ctx=8 * 512))
    try:
        return answer(e.submit(request))
    finally:
        e.close()


@pytest.fixture(scope="module")
def alone(shipped_gguf) -> list[tuple[str, int, str]]:
    return [answer_alone(shipped_gguf, story(t)) for t in TOPICS]


def test_eight_concurrent_greedy_streams_equal_each_alone(engine, alone):
    assert engine.parallel == 8
    with PeakRunning(engine) as running:
        gens = [engine.submit(story(t)) for t in TOPICS[:4]]
        first = next(iter(gens[0]))  # the first four are decoding: the others join between steps
        gens += [engine.submit(story(t)) for t in TOPICS[4:]]
        together = [answer(gens[0], first)] + [answer(g) for g in gens[1:]]
    assert running.peak == 8
    for (text, n, reason), (text_alone, n_alone, reason_alone) in zip(together, alone):
        assert (text, n, reason) == (text_alone, n_alone, reason_alone)
    assert all(n == MAX_TOKENS for _, n, _ in alone)  # long enough to overlap


def test_a_seeded_sampled_reply_is_the_same_alone_and_in_company(engine, shipped_gguf, alone):
    hot = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    by_itself = answer_alone(shipped_gguf, story(TOPICS[0], hot))
    others = [engine.submit(story(t)) for t in TOPICS[1:4]]
    in_company = answer(engine.submit(story(TOPICS[0], hot)))
    for g in others:
        g.text()
    assert in_company == by_itself
    assert by_itself[0] != alone[0][0]  # the seed did sample: not the greedy reply


def test_cancelling_one_stream_leaves_the_others_as_they_were(engine, alone):
    gens = [engine.submit(story(t)) for t in TOPICS[:4]]
    victim = gens[1]
    next(iter(victim))
    victim.cancel()
    victim.text()
    assert victim.stats.finish_reason == "cancelled" and victim.stats.generation.completion_tokens < MAX_TOKENS
    for i in (0, 2, 3):
        assert answer(gens[i]) == alone[i]


def test_more_slots_than_the_context_holds_is_refused(embedded_bundle):
    with pytest.raises(InputError, match="64 slots cannot share a context of 2048 tokens"):
        Engine.load(embedded_bundle, RuntimeOptions(n_ctx=2048, parallel=64))
    line = one_line_error(run_cli("serve", str(embedded_bundle), "--parallel", "64", "--n-ctx", "2048"))
    assert "lower --parallel or raise --n-ctx" in line


def test_a_slot_freed_by_a_cancel_takes_the_next_request(embedded_bundle):
    # what a client that disconnects does: the server cancels its generation (serve/app.py)
    e = Engine.load(embedded_bundle, RuntimeOptions(n_threads=1, parallel=2))  # its dragon story runs past 1000 tokens
    try:
        long = ChatRequest((Message.text("user", "Write a very long story about a dragon."),), max_tokens=1500)
        leaving, kept = e.submit(long), e.submit(long)
        next(iter(leaving)), next(iter(kept))  # both slots busy
        third = e.submit(ChatRequest((Message.text("user", "Say hi."),), max_tokens=8))
        assert e.status()["waiting"] == 1
        leaving.cancel()
        assert third.text() and third.stats.finish_reason in ("stop", "length")
        assert e.status()["running"] == 1  # the kept stream goes on beside it
        kept.cancel()
        kept.text()
        leaving.text()
        assert leaving.stats.cancelled and kept.stats.generation.completion_tokens > 1
    finally:
        e.close()
