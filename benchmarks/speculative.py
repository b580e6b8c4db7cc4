"""Speculative decoding: plain, prompt-lookup and draft-model decoding side by side in one run,
on a quoting/extraction prompt set and on free chat (greedy, so all three give the same replies).

    python benchmarks/speculative.py MODEL.gguf [--draft DRAFT.gguf] --threads 2 --max-tokens 128

decode tokens/s = generated tokens after each reply's first / decode seconds, summed over the set
(each prompt from an empty KV cache; the prompt's own evaluation is not in it). Acceptance =
draft tokens kept / draft tokens verified. Each configuration runs the whole set `--runs` times
and the median is reported, configurations interleaved so a busy machine hurts all alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from vishwamai_edge.profile.speculative import CHAT_PROMPTS, QUOTE_PROMPTS, decode_set  # noqa: E402
from vishwamai_edge.runtime.options import RuntimeOptions
from vishwamai_edge.runtime.pipeline import Pipeline  # noqa: E402
from vishwamai_edge.runtime.speculative import SpeculativeOptions, Speculator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--draft", type=Path, help="draft model GGUF (default: no draft-model column)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--draft-max", type=int, default=3, help="3: the most that pays on CPU threads (targets.py)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()

    pipeline = Pipeline.load(args.model, RuntimeOptions(n_ctx=2048, n_threads=args.threads))
    configs: dict[str, Speculator | None] = {
        "plain": None,
        "lookup": Speculator.load(SpeculativeOptions(mode="lookup", max_draft=args.draft_max), pipeline.llm),
    }
    if args.draft:
        configs["draft"] = Speculator.load(SpeculativeOptions(mode="draft", draft=args.draft,
                                                              max_draft=args.draft_max),
                                           pipeline.llm, args.threads)
    for spec in configs.values():
        if spec is not None and spec.note:
            print(f"note: {spec.note}", file=sys.stderr)
    sets = {"quoting/extraction": QUOTE_PROMPTS, "free chat": CHAT_PROMPTS}
    results: dict[str, dict[str, dict]] = {}
    try:
        for set_name, prompts in sets.items():
            runs: dict[str, list[dict]] = {name: [] for name in configs}
            decode_set(pipeline, prompts[:1], 8, None)  # warm
            for _ in range(args.runs):
                for name, spec in configs.items():
                    runs[name].append(decode_set(pipeline, prompts, args.max_tokens, spec))
            plain_replies = runs["plain"][0]["replies"]
            results[set_name] = {}
            for name, rs in runs.items():
                tps = statistics.median(r["decode_tps"] for r in rs)
                drafted, accepted = rs[0]["drafted"], rs[0]["accepted"]
                results[set_name][name] = {
                    "decode_tps": tps, "runs_tps": [r["decode_tps"] for r in rs], "tokens": rs[0]["tokens"],
                    "drafted": drafted, "accepted": accepted,
                    "acceptance": accepted / drafted if drafted else None,
                    "same_replies_as_plain": all(r["replies"] == plain_replies for r in rs),
                }
            base = results[set_name]["plain"]["decode_tps"]
            for r in results[set_name].values():
                r["speedup"] = r["decode_tps"] / base if base else None
    finally:
        for spec in configs.values():
            if spec is not None:
                spec.close()
        pipeline.close()

    print(f"model {args.model.name}; draft {args.draft.name if args.draft else '-'}; threads {args.threads}; "
          f"{args.max_tokens} tokens per reply at most; greedy; median of {args.runs} runs; "
          f"draft tokens per step at most {args.draft_max}")
    print(f"{'prompt set':<20} {'decoding':<8} {'tok/s':>7} {'speed-up':>9} {'accepted':>14} {'same replies':>13}")
    for set_name, rows in results.items():
        for name, r in rows.items():
            acc = f"{r['accepted']}/{r['drafted']} {r['acceptance'] * 100:.0f}%" if r["drafted"] else "-"
            print(f"{set_name:<20} {name:<8} {r['decode_tps']:7.1f} {r['speedup']:8.2f}x {acc:>14} "
                  f"{str(r['same_replies_as_plain']):>13}")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "max_tokens": args.max_tokens,
                                         "model": str(args.model), "draft": str(args.draft) if args.draft else None,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
