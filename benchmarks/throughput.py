"""Aggregate decode tokens/s with N concurrent greedy streams: our engine (continuous batching)
beside llama.cpp's own server (`llama-server -np N --cont-batching`) on the same GGUF, one run.

    python benchmarks/throughput.py MODEL.gguf --streams 1 4 8 16 --threads 1 \
        [--llama-server PATH/TO/llama-server]

Aggregate tokens/s = all streams' generated tokens / wall time from the first request sent to
the last reply done (prefill included, as a client sees it). llama-server is built from the
llama.cpp sources vendored in llama-cpp-python's sdist (same version as the runtime's).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from vishwamai_edge.runtime.engine import ChatRequest, Engine, Message  # noqa: E402

TOPICS = ["a dragon", "the sea", "a robot", "a lighthouse", "a baker", "the moon", "a fox", "a train"]


def prompt(i: int) -> str:
    return f"Write a long story about {TOPICS[i % len(TOPICS)]} number {i}."


def ours(model: Path, streams: int, threads: int, max_tokens: int, n_ctx_each: int) -> float:
    engine = Engine.load(model, n_threads=threads, parallel=streams, n_ctx=streams * n_ctx_each,
                         max_queue=streams)
    try:
        engine.submit(ChatRequest((Message.text("user", "hi"),), max_tokens=4)).text()  # warm
        t = time.perf_counter()
        gens = [engine.submit(ChatRequest((Message.text("user", prompt(i)),), max_tokens=max_tokens))
                for i in range(streams)]
        tokens = 0
        for g in gens:
            g.text()
            tokens += g.stats.generation.completion_tokens
        return tokens / (time.perf_counter() - t)
    finally:
        engine.close()


def llama_server(binary: Path, model: Path, streams: int, threads: int, max_tokens: int, n_ctx_each: int,
                 port: int = 18931) -> float:
    proc = subprocess.Popen([str(binary), "-m", str(model), "--port", str(port), "-np", str(streams),
                             "--cont-batching", "-c", str(streams * n_ctx_each), "-t", str(threads),
                             "-tb", str(threads), "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if json.load(urllib.request.urlopen(url + "/health", timeout=2)).get("status") == "ok":
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

        def ask(i: int, out: list) -> None:
            body = json.dumps({"messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens,
                               "temperature": 0}).encode()
            req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
            out.append(json.load(urllib.request.urlopen(req, timeout=600))["usage"]["completion_tokens"])

        ask(0, [])  # warm
        out: list[int] = []
        t = time.perf_counter()
        workers = [threading.Thread(target=ask, args=(i, out)) for i in range(streams)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return sum(out) / (time.perf_counter() - t)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-ctx-each", type=int, default=512)
    ap.add_argument("--llama-server", type=Path)
    args = ap.parse_args()
    print(f"model {args.model.name}, {args.threads} thread(s), {args.max_tokens} tokens a stream, greedy")
    print("streams  ours tok/s  llama-server tok/s")
    for n in args.streams:
        a = ours(args.model, n, args.threads, args.max_tokens, args.n_ctx_each)
        b = (llama_server(args.llama_server, args.model, n, args.threads, args.max_tokens, args.n_ctx_each)
             if args.llama_server else float("nan"))
        print(f"{n:7d}  {a:10.1f}  {b:18.1f}", flush=True)


if __name__ == "__main__":
    main()
