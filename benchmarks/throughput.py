"""N concurrent greedy streams: our engine (continuous batching) beside llama.cpp's own server
(`llama-server -np N --cont-batching`) on the same GGUF, one run, side by side.

    python benchmarks/throughput.py MODEL.gguf --streams 1 4 8 16 --threads 1 \
        [--llama-server PATH/TO/llama-server] [--kv-type q8_0] [--json out.json]

Per stream count, for each side:
- aggregate tokens/s = all streams' generated tokens / wall time from the first request sent to
  the last reply done (prefill included, as a client sees it);
- per-stream decode tokens/s (median stream);
- TTFT per stream, request sent -> first text (median stream and slowest stream).
Both sides get the same prompts (profile/concurrency.py's), slots, context per slot, threads and
KV type, and evaluate every prompt in full (no prefix cached from an earlier request). Ours runs in this process (the engine under `serve`, no HTTP: benchmarks/http_overhead.py
measures that part); llama-server is asked over HTTP with streaming, one thread per client.
llama-server is built from the llama.cpp sources vendored in llama-cpp-python's sdist (same
version as the runtime's): cmake -DLLAMA_BUILD_SERVER=ON, target llama-server.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from vishwamai_edge.profile.concurrency import prompt_text, run_level  # noqa: E402
from vishwamai_edge.runtime.engine import ChatRequest, Engine, Message  # noqa: E402
from vishwamai_edge.runtime.options import RuntimeOptions


def ours(model: Path, streams: int, threads: int, max_tokens: int, n_ctx_each: int, kv_type: str) -> dict:
    engine = Engine.load(model, RuntimeOptions(n_threads=threads, parallel=streams, n_ctx=streams * n_ctx_each, kv_type=kv_type), max_queue=streams)
    try:
        engine.submit(ChatRequest((Message.text("user", "hi"),), max_tokens=4)).text()  # warm
        level = run_level(engine, streams, max_tokens)
        return {"aggregate_tps": level["aggregate_tps"], "per_stream_tps": level["per_stream_tps"]["median"],
                "ttft_s": level["ttft_s"]["median"], "ttft_max_s": level["ttft_s"]["max"], "tokens": level["tokens"]}
    finally:
        engine.close()


def _stream_one(url: str, i: int, max_tokens: int, out: dict, content: str | None = None) -> None:
    """One streamed chat completion: time to the first content, tokens and decode rate."""
    body = json.dumps({"messages": [{"role": "user", "content": content or prompt_text(i)}],
                       "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                       # every prompt evaluated in full, as ours are (run_level empties the slots first)
                       "cache_prompt": False}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    sent = time.perf_counter()
    first = None
    chunks, tokens, tps = 0, None, None
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    first = first or time.perf_counter()
                    chunks += 1
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens", tokens)
            if event.get("timings"):  # llama-server's own: predicted_n, predicted_per_second
                tokens = event["timings"].get("predicted_n", tokens)
                tps = event["timings"].get("predicted_per_second", tps)
    out[i] = {"ttft_s": (first - sent) if first else None, "tokens": tokens if tokens is not None else chunks,
              "tps": tps}


def llama_server(binary: Path, model: Path, streams: int, threads: int, max_tokens: int, n_ctx_each: int,
                 kv_type: str, port: int = 18931) -> dict:
    cmd = [str(binary), "-m", str(model), "--port", str(port), "-np", str(streams), "--cont-batching",
           "-c", str(streams * n_ctx_each), "-t", str(threads), "-tb", str(threads), "--no-webui",
           "-ctk", kv_type, "-ctv", kv_type]
    if kv_type != "f16":
        cmd += ["-fa", "on"]  # a quantized V cache needs flash attention, as in our runtime
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if json.load(urllib.request.urlopen(url + "/health", timeout=2)).get("status") == "ok":
                    break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"llama-server did not start: {' '.join(cmd)}") from None
                time.sleep(0.3)
        _stream_one(url, 0, 4, {}, "hi")  # warm, with another prompt: no stream finds its own cached
        out: dict[int, dict] = {}
        t = time.perf_counter()
        workers = [threading.Thread(target=_stream_one, args=(url, i, max_tokens, out)) for i in range(streams)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t
        rows = [out[i] for i in range(streams)]
        ttft = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
        tps = [r["tps"] for r in rows if r["tps"]]
        tokens = sum(r["tokens"] for r in rows)
        return {"aggregate_tps": tokens / wall, "per_stream_tps": statistics.median(tps) if tps else None,
                "ttft_s": statistics.median(ttft) if ttft else None, "ttft_max_s": max(ttft) if ttft else None,
                "tokens": tokens}
    finally:
        proc.terminate()
        proc.wait(10)


def _cell(v: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-ctx-each", type=int, default=512)
    ap.add_argument("--kv-type", default="f16")
    ap.add_argument("--llama-server", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import os

    print(f"model {args.model.name}, {args.threads} thread(s), {args.max_tokens} tokens a stream, greedy, "
          f"KV {args.kv_type}, {args.n_ctx_each} context a slot; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print("                  ours                                 |  llama-server")
    print("streams  agg tok/s  stream tok/s  TTFT ms  TTFT max ms  |  agg tok/s  stream tok/s  TTFT ms  TTFT max ms")
    results = []
    for n in args.streams:
        a = ours(args.model, n, args.threads, args.max_tokens, args.n_ctx_each, args.kv_type)
        b = (llama_server(args.llama_server, args.model, n, args.threads, args.max_tokens, args.n_ctx_each,
                          args.kv_type) if args.llama_server else {})
        results.append({"streams": n, "ours": a, "llama_server": b or None})
        side = [f"{_cell(s.get('aggregate_tps')):>9}  {_cell(s.get('per_stream_tps')):>12}  "
                f"{_cell(s.get('ttft_s'), 1e3, 0):>7}  {_cell(s.get('ttft_max_s'), 1e3, 0):>11}" for s in (a, b)]
        print(f"{n:7d}  {side[0]}  |  {side[1]}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"model": str(args.model),
                                                                   "llama_server": str(args.llama_server),
                                                                   "json": str(args.json)},
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
