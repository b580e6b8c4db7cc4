"""A pruned and distilled student against its teacher: decode speed of both bundles side by side in one run, the
memory plan of both on a device target, and their sizes.

    python benchmarks/student.py --teacher build/smollm2-135m/laptop-cpu \
        --student build/smollm2-135m-distill/laptop-cpu --student-hf build/smollm2-135m-distill/finetune/model

Each bundle runs in its own process (its own peak RSS), alternately for --rounds rounds so that the machine's load
falls on both alike; each round prefills the same chat prompt and decodes --tokens tokens greedily through the
runtime's llama.cpp backend (the profile's own measurement). Reported: the median decode and prefill tokens/s,
peak RSS, GGUF size, and `plan_memory` for --target (default orin-nano-8) from each model's config.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

PROMPT = "Explain in a few paragraphs how a for loop in Python works, with an example."


def child(bundle: str, ids: list[int], tokens: int, threads: int) -> dict:
    from vishwamai_edge.profile.measure import run_prompt
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(Path(bundle), RuntimeOptions(n_ctx=2048, n_threads=threads))
    run_prompt(pipeline.llm, ids, 8)  # warm-up
    r = run_prompt(pipeline.llm, ids, tokens)
    pipeline.close()
    return {"decode_tps": r.decode_tps, "prefill_tps": len(ids) / r.prefill_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def memory_plan(hf_dir: Path, target_name: str, fmt: str, n_ctx: int) -> dict:
    from vishwamai_edge.memory_plan import model_size, plan_memory
    from vishwamai_edge.targets import get_target

    size = model_size(json.loads((hf_dir / "config.json").read_text()), hf_dir.name)
    return {"params_m": size.params / 1e6, **plan_memory(size, get_target(target_name), fmt, n_ctx).to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the teacher's bundle")
    parser.add_argument("--student", required=True, help="the student's bundle")
    parser.add_argument("--teacher-hf", help="the teacher's HF folder (default: the embedded model)")
    parser.add_argument("--student-hf", required=True, help="the student's HF folder (finetune/model)")
    parser.add_argument("--target", default="orin-nano-8")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # bundle, comma-separated prompt ids
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.child:
        ids = [int(t) for t in args.child[1].split(",")]
        print(json.dumps(child(args.child[0], ids, args.tokens, args.threads)))
        return

    from vishwamai_edge.runtime.bundle import Bundle
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline
    from vishwamai_edge.sources.embedded import embedded_hf_dir

    pipeline = Pipeline.load(Path(args.teacher), RuntimeOptions(n_ctx=2048, n_threads=args.threads))
    ids = pipeline.session().prompt_tokens([{"role": "user", "content": PROMPT}])
    pipeline.close()
    bundles = {"teacher": args.teacher, "student": args.student}
    runs: dict[str, list[dict]] = {name: [] for name in bundles}
    for k in range(args.rounds):
        for name, bundle in bundles.items():
            cmd = [sys.executable, __file__, "--teacher", args.teacher, "--student", args.student,
                   "--student-hf", args.student_hf, "--threads", str(args.threads), "--tokens", str(args.tokens),
                   "--child", bundle, ",".join(map(str, ids))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
        print(f"round {k + 1}/{args.rounds}: " + ", ".join(f"{n} {runs[n][-1]['decode_tps']:.1f} tok/s" for n in runs),
              file=sys.stderr)

    hf = {"teacher": Path(args.teacher_hf) if args.teacher_hf else embedded_hf_dir(), "student": Path(args.student_hf)}
    results = {}
    for name, bundle in bundles.items():
        b = Bundle.load(Path(bundle))
        results[name] = {
            "decode_tps": statistics.median(r["decode_tps"] for r in runs[name]),
            "prefill_tps": statistics.median(r["prefill_tps"] for r in runs[name]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[name]),
            "gguf_mb": b.llm_path().stat().st_size / 2**20,
            "plan": memory_plan(hf[name], args.target, b.manifest.llm.quant, args.n_ctx),
        }
    t, s = results["teacher"], results["student"]
    print(f"\n{len(ids)}-token chat prompt, {args.tokens} tokens decoded greedily, {args.threads} threads, "
          f"median of {args.rounds} alternating rounds\n")
    print(f"| model | params | GGUF | decode tok/s | prefill tok/s | peak RSS | {args.target} plan, n_ctx {args.n_ctx} |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        p = r["plan"]
        print(f"| {name} | {p['params_m']:.1f}M | {r['gguf_mb']:.1f} MB | {r['decode_tps']:.1f} | "
              f"{r['prefill_tps']:.0f} | {r['peak_rss_mb']:.0f} MB | weights {p['weights_gb']:.3f} + KV "
              f"{p['kv_cache_gb']:.3f} + runtime {p['overhead_gb']:.2f} = {p['total_gb']:.3f} GB |")
    print(f"\nstudent / teacher: decode {s['decode_tps'] / t['decode_tps']:.2f}x, "
          f"weights + KV {(s['plan']['weights_gb'] + s['plan']['kv_cache_gb']) / (t['plan']['weights_gb'] + t['plan']['kv_cache_gb']):.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
