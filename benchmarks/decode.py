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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_runtime(args) -> dict:
    """The profile's own run: prefill with an empty KV cache, then stream greedily."""
    from vishwamai_edge.profile.measure import run_prompt
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(args.bundle, RuntimeOptions(n_ctx=2048, n_threads=args.threads))
    decode = [run_prompt(pipeline.llm, args.prompt_ids, args.tokens) for _ in range(args.repeat)]
    ttft = [run_prompt(pipeline.llm, args.long_ids, 1).ttft_s for _ in range(args.repeat)]
    pipeline.close()
    return {"decode_tps": statistics.median(r.decode_tps for r in decode),
            "ttft_512_s": statistics.median(ttft), "peak_rss_mb": peak_rss_mb()}


def bench_raw(args) -> dict:
    """llama_cpp.Llama.generate on the same file, through the profile's overhead scenario."""
    from vishwamai_edge.profile.overhead import RawLlama
    from vishwamai_edge.runtime.bundle import Bundle

    raw = RawLlama(Bundle.load(args.bundle).llm_path(), n_ctx=2048, n_threads=args.threads)
    decode = [raw.run(args.prompt_ids, args.tokens)["decode_tps"] for _ in range(args.repeat)]
    ttft = [raw.run(args.long_ids, 1)["ttft_s"] for _ in range(args.repeat)]
    raw.close()
    return {"decode_tps": statistics.median(decode), "ttft_512_s": statistics.median(ttft),
            "peak_rss_mb": peak_rss_mb()}


def bench_transformers(args) -> dict:
    import torch
    import transformers

    from vishwamai_edge.sources.embedded import embedded_hf_dir

    torch.set_num_threads(args.threads)
    hf_dir = Path(args.hf_dir) if args.hf_dir else embedded_hf_dir()
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
    parser.add_argument("--long-ids", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    if args.engine:
        args.prompt_ids = [int(t) for t in args.prompt_ids.split(",")]
        args.long_ids = [int(t) for t in args.long_ids.split(",")]
        print(json.dumps(ENGINES[args.engine](args)))
        return

    # One chat-formatted prompt and one 512-token prompt, tokenized once, the same ids for every engine.
    from vishwamai_edge.profile.measure import prompt_ids as filler_ids
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(args.bundle, RuntimeOptions(n_ctx=2048, n_threads=args.threads))
    prompt_ids = pipeline.session().prompt_tokens([{"role": "user", "content": PROMPT}])
    long_ids = filler_ids(pipeline.llm, 512)
    pipeline.close()

    results = {}
    for engine in ENGINES:
        cmd = [sys.executable, __file__, "--engine", engine, "--bundle", args.bundle, "--threads", str(args.threads),
               "--tokens", str(args.tokens), "--repeat", str(args.repeat),
               "--prompt-ids", ",".join(map(str, prompt_ids)), "--long-ids", ",".join(map(str, long_ids))]
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
