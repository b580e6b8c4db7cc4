"""Decode speed of the runtime against raw llama-cpp-python and transformers fp32.

    python benchmarks/decode.py --bundle build/smollm2-135m/laptop-cpu --threads 2

Each engine runs in its own process (so peak RSS is its own) on the same GGUF,
thread count, prompt and greedy decoding:
  runtime       vishwamai-edge's llama.cpp backend (prefill + stream)
  raw           llama_cpp.Llama.generate on the same file
  transformers  AutoModelForCausalLM.generate, fp32, on the bundle's HF source
Reported: decode tokens/s (median of --repeat runs), time to first token for a
512-token prompt, peak RSS, and the ratios the project aims at (runtime/raw >= 0.97,
runtime/transformers >= 8).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a map in a bottle."
LONG_TEXT = (
    "Edge devices run language models close to where data is produced. They have little memory, "
    "share it between CPU and GPU, and are judged by latency and power as much as by quality. "
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_runtime(args) -> dict:
    from vishwamai_edge.runtime.backends import SamplingParams, TokenSegment
    from vishwamai_edge.runtime.session import Pipeline

    pipeline = Pipeline.load(args.bundle, n_ctx=2048, n_threads=args.threads)
    llm = pipeline.llm
    prompt = args.prompt_ids
    speeds, counts = [], []
    for _ in range(args.repeat):
        llm.prefill([TokenSegment([prompt[0]])])  # drop the cache: every run decodes from scratch
        llm.prefill([TokenSegment(prompt)])
        n, start = 0, None
        for _tok in llm.stream(SamplingParams(temperature=0.0), args.tokens):
            n += 1
            if n == 1:
                start = time.perf_counter()
        speeds.append((n - 1) / (time.perf_counter() - start))
        counts.append(n)
    long_prompt = (llm.tokenize(LONG_TEXT * 40, add_special=True))[:512]
    ttfts = []
    for _ in range(args.repeat):
        llm.prefill([TokenSegment([long_prompt[-1]])])
        t0 = time.perf_counter()
        llm.prefill([TokenSegment(long_prompt)])
        next(iter(llm.stream(SamplingParams(temperature=0.0), 1)), None)
        ttfts.append(time.perf_counter() - t0)
    pipeline.close()
    return {"decode_tps": statistics.median(speeds), "tokens": min(counts),
            "ttft_512_s": statistics.median(ttfts), "peak_rss_mb": peak_rss_mb()}


def bench_raw(args) -> dict:
    import llama_cpp

    from vishwamai_edge.runtime.bundle import Bundle

    gguf = Bundle.load(args.bundle).llm_path()
    llm = llama_cpp.Llama(str(gguf), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                          n_batch=512, verbose=False)
    prompt = args.prompt_ids
    speeds = []
    for _ in range(args.repeat):
        llm.reset()
        n, start = 0, None
        for _tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            n += 1
            if n == 1:
                start = time.perf_counter()
            if n >= args.tokens:
                break
        speeds.append((n - 1) / (time.perf_counter() - start))
    long_prompt = llm.tokenize((LONG_TEXT * 40).encode(), add_bos=True)[:512]
    ttfts = []
    for _ in range(args.repeat):
        llm.reset()
        t0 = time.perf_counter()
        next(llm.generate(long_prompt, temp=0.0, top_k=1, reset=True))
        ttfts.append(time.perf_counter() - t0)
    return {"decode_tps": statistics.median(speeds), "ttft_512_s": statistics.median(ttfts),
            "peak_rss_mb": peak_rss_mb()}


def bench_transformers(args) -> dict:
    import torch
    import transformers

    from vishwamai_edge.sources import embedded_hf_dir

    torch.set_num_threads(args.threads)
    hf_dir = Path(args.hf_dir) if args.hf_dir else embedded_hf_dir()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([args.prompt_ids])
    n = min(args.tokens, 64)  # fp32 is slow: fewer tokens give the same per-token figure

    def timed(new_tokens: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return time.perf_counter() - t0

    speeds = []
    for _ in range(args.repeat):
        one = timed(1)  # prompt + first token, subtracted to leave decode only
        speeds.append((n - 1) / (timed(n) - one))
    return {"decode_tps": statistics.median(speeds), "peak_rss_mb": peak_rss_mb()}


ENGINES = {"runtime": bench_runtime, "raw": bench_raw, "transformers": bench_transformers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="build/smollm2-135m/laptop-cpu")
    parser.add_argument("--hf-dir", help="HF folder for the transformers baseline (default: the embedded model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engine", choices=list(ENGINES), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    if args.engine:
        args.prompt_ids = [int(t) for t in args.prompt_ids.split(",")]
        print(json.dumps(ENGINES[args.engine](args)))
        return

    # One chat-formatted prompt, tokenized once, fed as the same ids to every engine.
    from vishwamai_edge.runtime.session import Pipeline

    pipeline = Pipeline.load(args.bundle, n_ctx=2048, n_threads=args.threads)
    prompt_ids = pipeline.session().prompt_tokens([{"role": "user", "content": PROMPT}])
    pipeline.close()

    results = {}
    for engine in ENGINES:
        cmd = [sys.executable, __file__, "--engine", engine, "--bundle", args.bundle, "--threads", str(args.threads),
               "--tokens", str(args.tokens), "--repeat", str(args.repeat),
               "--prompt-ids", ",".join(map(str, prompt_ids))]
        if args.hf_dir:
            cmd += ["--hf-dir", args.hf_dir]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[engine] = json.loads(out.strip().splitlines()[-1])
        print(f"{engine:13s} {json.dumps(results[engine])}", file=sys.stderr)

    rt, raw, tf = results["runtime"], results["raw"], results["transformers"]
    summary = {
        "bundle": args.bundle, "threads": args.threads,
        "runtime_vs_raw": rt["decode_tps"] / raw["decode_tps"],
        "runtime_vs_transformers": rt["decode_tps"] / tf["decode_tps"],
        "results": results,
    }
    print("| engine | decode tok/s | TTFT 512-token prompt | peak RSS |")
    print("|---|---|---|---|")
    for name, r in results.items():
        ttft = f"{r['ttft_512_s'] * 1000:.0f} ms" if "ttft_512_s" in r else "-"
        print(f"| {name} | {r['decode_tps']:.1f} | {ttft} | {r['peak_rss_mb']:.0f} MB |")
    print(f"\nruntime / raw llama-cpp-python: {summary['runtime_vs_raw']:.3f} (aim >= 0.97)")
    print(f"runtime / transformers fp32:    {summary['runtime_vs_transformers']:.1f}x (aim >= 8x)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
