"""KV-cache memory and quality per cache type (f16, q8_0, q4_0) at several context lengths.

    python benchmarks/kv_cache.py [MODEL.gguf] --contexts 2048 8192 --threads 1 [--json out.json]

For each type and context: the K and V bytes llama.cpp reports allocating (its log line
`llama_kv_cache: size = ...`), the formula n_layer x n_ctx x n_head_kv x (head_dim_k +
head_dim_v) x bytes per element (q8_0 34/32, q4_0 18/32: runtime/kv_cache.py), their
difference, and the ratio to f16. Quality, per type: the largest |logit - f16 logit| over every
position of profile/kv_cache.py's fixed prompts and the top-1 agreement (contexts of the first
size; each prompt in one batch from an empty cache). With --speed, also the decode rate per type
after a prompt of --speed-prompt tokens (contexts of the first size): a quantized cache is
read with flash attention, and its blocks are dequantized on every step. Default model: the
embedded SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from vishwamai_edge.profile.gguf_meta import model_shape  # noqa: E402
from vishwamai_edge.profile.kv_cache import formula_bytes, quality  # noqa: E402
from vishwamai_edge.profile.measure import prompt_ids, run_prompt  # noqa: E402
from vishwamai_edge.runtime.backends.llamacpp import LlamaCppBackend  # noqa: E402
from vishwamai_edge.runtime.kv_cache import KV_TYPES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, nargs="?")
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--types", nargs="+", default=list(KV_TYPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed", action="store_true", help="also time decoding after a long prompt")
    ap.add_argument("--speed-prompt", type=int, default=1024)
    ap.add_argument("--speed-decode", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.model is None:
        from vishwamai_edge.sources.embedded import embedded_gguf

        args.model = embedded_gguf()
    shape = model_shape(args.model)
    print(f"model {args.model.name}: {shape.n_layer} layers, {shape.n_head_kv} KV heads x "
          f"{shape.head_dim_k}/{shape.head_dim_v}; {args.threads} thread(s)")
    rows = []
    print("context  type   cells   KV MiB (llama.cpp)  KV MiB (formula)  diff bytes  of f16  max|dlogit|  top-1 %"
          + ("  prefill tok/s  decode tok/s" if args.speed else ""))
    ref_quality: dict[str, dict] = {}
    for n_ctx in args.contexts:
        ref = LlamaCppBackend.load(args.model, n_ctx=n_ctx, n_threads=args.threads, kv_type="f16") \
            if n_ctx == args.contexts[0] else None
        try:
            for name in args.types:
                llm = LlamaCppBackend.load(args.model, n_ctx=n_ctx, n_threads=args.threads, kv_type=name)
                try:
                    rep = llm.kv_report
                    measured = rep["k_bytes"] + rep["v_bytes"]
                    formula = formula_bytes(shape, rep["cells"], name)
                    f16 = formula_bytes(shape, rep["cells"], "f16")
                    if ref is not None:
                        ref_quality[name] = ({"max_abs_logit_diff": 0.0, "top1_agreement": 1.0} if name == "f16"
                                             else quality(llm, ref))
                        if args.speed:
                            ids = prompt_ids(llm, args.speed_prompt)
                            run_prompt(llm, ids[:64], 4)  # warm
                            t = run_prompt(llm, ids, args.speed_decode)
                            ref_quality[name].update(prefill_tps=t.prefill_tps, decode_tps=t.decode_tps)
                finally:
                    llm.close()
                q = {k: v for k, v in ref_quality.get(name, {}).items()  # speed: timed at the first size only
                     if ref is not None or k not in ("prefill_tps", "decode_tps")}
                row = {"n_ctx": n_ctx, "type": name, "cells": rep["cells"], "bytes": measured,
                       "formula_bytes": formula, "ratio_to_f16": measured / f16, **q}
                rows.append(row)
                print(f"{n_ctx:7d}  {name:5s}  {rep['cells']:6d}  {measured / 2**20:18.2f}  {formula / 2**20:16.2f}  "
                      f"{measured - formula:10d}  {measured / f16:6.3f}  {q.get('max_abs_logit_diff', 0):11.4f}  "
                      f"{q.get('top1_agreement', 1) * 100:7.1f}"
                      + (f"  {q['prefill_tps']:13.1f}  {q['decode_tps']:12.1f}" if "decode_tps" in q else ""),
                      flush=True)
        finally:
            if ref is not None:
                ref.close()
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
