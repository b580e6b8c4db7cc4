"""Continuous batching over real HTTP: a `vishwamai-edge serve --parallel N` process on 127.0.0.1
with the shipped SmolLM2-135M GGUF (Q4_1: batched rows equal single rows, see test_batching.py).

- A client that disconnects in the middle of its stream stops only its own reply: the three
  streams beside it end exactly as each request does alone.
- The slot a disconnect frees is taken by the request waiting for one, while the other stream
  goes on."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from serve_process import start_server, stop_server

from vishwamai_edge.runtime.engine import ChatRequest, Engine, Message
from vishwamai_edge.runtime.options import RuntimeOptions
from vishwamai_edge.sources.embedded import embedded_gguf

pytestmark = pytest.mark.e2e

TOPICS = ["a dragon", "the sea", "a robot", "a lighthouse"]
MAX_TOKENS = 24


def story(topic: str) -> str:
    return f"Write a long story about {topic}."


@pytest.fixture
def server_of(tmp_path):
    started = []

    def start(parallel: int):
        live = start_server(embedded_gguf(), tmp_path / f"server-{parallel}.log", "--parallel", str(parallel),
                            "--max-queue", "8")
        started.append(live)
        return live

    yield start
    for live in started:
        stop_server(live)


def queue(server) -> dict:
    return server.health()["queue"]


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Stream(threading.Thread):
    """One streamed chat completion in its own connection. `leave` set: the client disconnects at
    its next chunk, without reading the rest."""

    def __init__(self, server, content: str, max_tokens: int):
        super().__init__(daemon=True)
        self.server, self.content, self.max_tokens = server, content, max_tokens
        self.pieces: list[tuple[float, str]] = []
        self.finish: str | None = None
        self.started = threading.Event()
        self.leave = threading.Event()
        self.error: BaseException | None = None

    @property
    def text(self) -> str:
        return "".join(p for _, p in self.pieces)

    def run(self) -> None:
        body = {"model": self.server.model, "messages": [{"role": "user", "content": self.content}],
                "max_tokens": self.max_tokens, "temperature": 0, "stream": True}
        try:
            with httpx.Client(timeout=300) as client:
                with client.stream("POST", self.server.base_url + "/chat/completions", json=body,
                                   headers=self.server.headers()) as resp:
                    resp.raise_for_status()
                    for line in resp.iter_lines():
                        if self.leave.is_set():
                            return  # closing the response and the client drops the connection
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        for choice in json.loads(line[6:]).get("choices", []):
                            piece = choice.get("delta", {}).get("content")
                            if piece:
                                self.pieces.append((time.monotonic(), piece))
                                self.started.set()
                            self.finish = choice.get("finish_reason") or self.finish
        except BaseException as exc:
            self.error = exc
        finally:
            self.started.set()


def alone(content: str) -> str:
    """The reply a fresh engine with the server's settings (4 slots, 1 thread) gives this request alone."""
    e = Engine.load(embedded_gguf(), RuntimeOptions(n_threads=1, parallel=4))
    try:
        return e.submit(ChatRequest((Message.text("user", content),), max_tokens=MAX_TOKENS)).text()
    finally:
        e.close()


def test_a_client_that_disconnects_leaves_the_other_streams_as_they_were(server_of):
    expected = [alone(story(t)) for t in TOPICS]
    server = server_of(4)
    streams = [Stream(server, story(t), MAX_TOKENS) for t in TOPICS]
    victim = streams[1]
    for s in streams:
        s.start()
    victim.started.wait(120)
    victim.leave.set()
    for s in streams:
        s.join(300)
        assert not s.is_alive()
    for i in (0, 2, 3):
        assert streams[i].error is None, streams[i].error
        assert streams[i].finish == "length"
        assert streams[i].text == expected[i]
    assert victim.finish is None and len(victim.text) < len(expected[1])
    wait_for(lambda: queue(server)["served"] == 4)
    assert queue(server)["cancelled"] == 1  # the server stopped the reply nobody was reading


def test_a_slot_freed_by_a_disconnect_takes_the_waiting_request(server_of):
    server = server_of(2)
    long = "Write a very long story about a dragon."  # runs past 1000 tokens
    leaving, kept = Stream(server, long, 1500), Stream(server, long, 1500)
    for s in (leaving, kept):
        s.start()
        s.started.wait(120)
        assert s.pieces, s.error
    assert queue(server)["running"] == 2  # both slots busy

    reply: dict = {}

    def ask() -> None:
        body = {"model": server.model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8,
                "temperature": 0}
        r = httpx.post(server.base_url + "/chat/completions", json=body, headers=server.headers(), timeout=300)
        reply.update(status=r.status_code, body=r.json(), done=time.monotonic())

    waiting = threading.Thread(target=ask, daemon=True)
    waiting.start()
    wait_for(lambda: queue(server)["waiting"] == 1)  # no slot for it yet
    leaving.leave.set()
    waiting.join(300)
    assert reply["status"] == 200, reply
    assert reply["body"]["choices"][0]["message"]["content"]
    assert reply["body"]["choices"][0]["finish_reason"] in ("stop", "length")
    assert queue(server)["cancelled"] == 1
    # the kept stream went on beside the new request, and after it: it never lost its slot
    wait_for(lambda: any(t > reply["done"] for t, _ in kept.pieces))
    assert kept.is_alive() and kept.error is None and kept.finish is None
    kept.leave.set()
    kept.join(300)
    leaving.join(300)
    wait_for(lambda: queue(server)["running"] == 0 and queue(server)["served"] == 3)
