"""What the HTTP path adds: time to first token and tokens/s, in-process against `serve`.

    python benchmarks/http_overhead.py --bundle build/smollm2-135m/laptop-cpu --threads 1

Three readers of the same bundle, same prompts, greedy, the same token budget:
  session   ChatSession.generate in this process (the reference)
  engine    the shared Engine in this process (queue + worker thread + stream hand-off)
  http      `vishwamai-edge serve` in a subprocess, read with the `openai` client over SSE
Each is timed from the caller's side: TTFT from the call to the first text piece, tokens/s
as (completion tokens - 1) / (last piece - first piece). Medians of --repeat runs after
--warmup runs, taken in turns; every run's prompt opens differently, so each evaluates
the same fresh suffix after the chat template's cached prefix.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a map in a bottle.",
    "Write a long story about a fox who wants to learn to sing.",
    "Write a long story about a robot that tends a garden on the moon.",
    "Write a long story about two friends who build a boat.",
]


def timed(pieces, completion_tokens) -> dict[str, float]:
    """Drain an iterator of text pieces; completion_tokens() is read after it ends."""
    start = time.perf_counter()
    first = last = None
    for piece in pieces:
        if piece:
            last = time.perf_counter()
            first = first or last
    n = completion_tokens()
    span = (last or start) - (first or start)
    return {"ttft_ms": ((first or start) - start) * 1000, "tokens_per_s": (n - 1) / span if span > 0 else 0.0,
            "tokens": n}


def bench_session(pipeline, prompt: str, max_tokens: int) -> dict[str, float]:
    session = pipeline.session(max_tokens=max_tokens)
    return timed(session.generate([{"role": "user", "content": prompt}]),
                 lambda: session.last_stats.completion_tokens)


def bench_engine(engine, prompt: str, max_tokens: int) -> dict[str, float]:
    from vishwamai_edge.runtime.engine import ChatRequest, Message

    gen = engine.submit(ChatRequest((Message.text("user", prompt),), max_tokens=max_tokens))
    return timed(gen, lambda: gen.stats.generation.completion_tokens)


def bench_http(client, model: str, prompt: str, max_tokens: int) -> dict[str, float]:
    usage: dict[str, int] = {}

    def pieces():
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage:
                usage["n"] = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    return timed(pieces(), lambda: usage["n"])


def run_interleaved(readers: dict, args) -> dict[str, dict[str, float]]:
    """Round-robin over the readers, so load from elsewhere on the machine hits them alike."""
    n = 0

    def prompt(i: int) -> str:
        # A unique opening per run: the KV cache keeps only the template's shared prefix, for every reader.
        nonlocal n
        n += 1
        return f"Story {n}. {PROMPTS[i % len(PROMPTS)]}"

    for fn in readers.values():
        for i in range(args.warmup):
            fn(prompt(i), args.tokens)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in readers}
    for i in range(args.repeat):
        for name, fn in readers.items():
            runs[name].append(fn(prompt(i), args.tokens))
    out = {}
    for name, rs in runs.items():
        out[name] = {k: statistics.median(r[k] for r in rs) for k in ("ttft_ms", "tokens_per_s", "tokens")}
        o = out[name]
        print(f"{name:8s} TTFT {o['ttft_ms']:7.1f} ms   {o['tokens_per_s']:7.1f} tokens/s   "
              f"({o['tokens']:.0f} tokens, median of {args.repeat})", flush=True)
    return out


def start_server(args) -> tuple[subprocess.Popen, str, str]:
    """`vishwamai-edge serve` on a free port: (process, base URL, model id)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vishwamai_edge.cli", "serve", str(args.bundle), "--port", str(port),
         "--threads", str(args.threads)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ,
    )
    import httpx

    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            return proc, url + "/v1", httpx.get(url + "/health", timeout=2).json()["model"]
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--repeat", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    from openai import OpenAI

    from vishwamai_edge.runtime.engine import Engine
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    # The server is its own process with its own copy of the model; the two in-process readers
    # share one pipeline (the engine's worker is idle while the session reads).
    proc, base_url, model = start_server(args)
    pipeline = Pipeline.load(args.bundle, RuntimeOptions(n_threads=args.threads))
    engine = Engine(pipeline)
    try:
        with OpenAI(base_url=base_url, api_key="none", max_retries=0) as client:
            results = run_interleaved({
                "session": lambda p, n: bench_session(pipeline, p, n),
                "engine": lambda p, n: bench_engine(engine, p, n),
                "http": lambda p, n: bench_http(client, model, p, n),
            }, args)
    finally:
        engine.close()  # closes the pipeline too
        proc.terminate()
        proc.wait()

    ref, http = results["session"], results["http"]
    added = {"ttft_ms": http["ttft_ms"] - ref["ttft_ms"],
             "tokens_per_s_ratio": http["tokens_per_s"] / ref["tokens_per_s"] if ref["tokens_per_s"] else 0.0}
    print(f"HTTP adds {added['ttft_ms']:+.1f} ms to the first token; decode speed x{added['tokens_per_s_ratio']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "max_tokens": args.tokens, "repeat": args.repeat,
                                         "results": results, "http_added": added}, indent=2))


if __name__ == "__main__":
    main()
