"""The concurrency scenario: N clients at once against the engine that `serve` and `ui` run.

The engine is loaded in this process with one slot per client of the largest level (continuous
batching, runtime/slots.py), and each level sends its N greedy requests at once, one reader
thread a client, as N HTTP clients would. Per level:
- aggregate tokens/s: every stream's generated tokens / wall time from the first request sent
  to the last reply finished (prompt evaluation included, as the clients see it);
- per-stream tokens/s: each stream's decode rate (runtime.generation_stats.DECODE_RATE_DEFINITION);
- TTFT: each stream's time from its request sent to its first text piece (prompts are
  evaluated one chunk per engine step, so later streams wait for earlier prompts).
Every level starts with empty slots, so no request reuses another's cached prompt.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from .stats import summarize

CLIENTS = (1, 2, 4, 8, 16)
TOPICS = ("a dragon", "the sea", "a robot", "a lighthouse", "a baker", "the moon", "a fox", "a train")
PROMPT_ROOM = 128  # per slot: the chat template and the request, before the generated tokens


def context_per_slot(decode_tokens: int) -> int:
    """Each slot's context, in llama.cpp's steps of 256 cells."""
    return -(-(PROMPT_ROOM + decode_tokens) // 256) * 256


def load_engine(path: Path, threads: int, decode_tokens: int, kv_type: str | None, clients: int = max(CLIENTS)):
    from ..runtime.engine import Engine
    from ..runtime.options import RuntimeOptions
    from ..runtime.pipeline import Pipeline

    per_slot = context_per_slot(decode_tokens)
    pipeline = Pipeline.load(path, RuntimeOptions(n_ctx=clients * per_slot, n_threads=threads, parallel=clients,
                                                  kv_type=kv_type, verify=False))
    return Engine(pipeline, max_queue=clients)


def prompt_text(i: int) -> str:
    """Client i's request (benchmarks/throughput.py sends llama-server the same)."""
    return f"Write a long story about {TOPICS[i % len(TOPICS)]} (story {i})."


def _request(i: int, decode_tokens: int):
    from ..runtime.engine import ChatRequest, Message

    return ChatRequest((Message.text("user", prompt_text(i)),), max_tokens=decode_tokens)


def run_level(engine: Any, clients: int, decode_tokens: int) -> dict[str, Any]:
    """N requests at once; aggregate and per-stream numbers of that one run."""
    # the engine is idle here (its worker waits for a request): emptying the cache races with nothing
    engine.pipeline.llm.reset()
    first: list[float | None] = [None] * clients
    sent: list[float] = [0.0] * clients
    gens: list[Any] = [None] * clients
    errors: list[BaseException] = []

    def read(i: int) -> None:
        try:
            for _ in gens[i]:
                if first[i] is None:
                    first[i] = time.perf_counter()
        except BaseException as exc:  # reported after the join, not lost in a thread
            errors.append(exc)

    t0 = time.perf_counter()
    for i in range(clients):
        sent[i] = time.perf_counter()
        gens[i] = engine.submit(_request(i, decode_tokens))
    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(clients)]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    tokens = [g.stats.generation.completion_tokens for g in gens]
    ttft = [(f - s) if f is not None else None for f, s in zip(first, sent)]
    per_stream = [g.stats.generation.decode_tokens_per_s or None for g in gens]
    return {
        "clients": clients,
        "tokens": sum(tokens),
        "wall_s": wall,
        "aggregate_tps": sum(tokens) / wall if wall > 0 else None,
        "per_stream_tps": summarize(per_stream),
        "ttft_s": summarize(ttft),
    }


def run_concurrency(engine: Any, decode_tokens: int, levels: tuple[int, ...] = CLIENTS) -> dict[str, Any]:
    """One run of the scenario: every level once."""
    return {"levels": [run_level(engine, n, decode_tokens) for n in levels]}


def summarize_levels(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per level, over the measured runs: aggregate tokens/s, the median stream's tokens/s, the
    median stream's TTFT and the slowest stream's TTFT."""
    out = []
    levels = [lv["clients"] for lv in runs[0]["levels"]] if runs else []
    for n in levels:
        rows = [lv for r in runs for lv in r["levels"] if lv["clients"] == n]
        out.append({
            "clients": n,
            "aggregate_tps": summarize([r["aggregate_tps"] for r in rows]),
            "per_stream_tps": summarize([(r["per_stream_tps"] or {}).get("median") for r in rows]),
            "ttft_s": summarize([(r["ttft_s"] or {}).get("median") for r in rows]),
            "ttft_max_s": summarize([(r["ttft_s"] or {}).get("max") for r in rows]),
        })
    return out
