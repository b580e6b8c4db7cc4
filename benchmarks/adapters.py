"""LoRA adapters on the device: sizes, the cost of switching, decode speed with and without one.

    python benchmarks/adapters.py BUNDLE [--adapter NAME] [--threads 2] [--runs 5]

BUNDLE is a bundle with an adapter (`vishwamai-edge build --recipe recipes/smollm2-135m-finetune.yaml
--add-to build/smollm2-135m/laptop-cpu --set export.adapter.name=marrowick`). Measured in one
process on one loaded model, median of --runs:
- switch: `use_adapter` (llama_set_adapters_lora + emptying the KV cache) alone, and the time to
  the first token of a request that switches, against one that does not (the prompt is then
  evaluated again from scratch: positions computed under another adapter are never reused);
- decode tokens/s of 64 greedy tokens on the base alone and with the adapter applied.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

PROMPT = "Tell me about the harbour towns of the north coast and what visitors see there."


def main() -> None:
    from vishwamai_edge.runtime.backends import SamplingParams
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--adapter", default=None, help="default: the bundle's first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    pipeline = Pipeline.load(args.bundle, RuntimeOptions(n_threads=args.threads))
    name = args.adapter or sorted(pipeline.adapters)[0]
    entry = pipeline.adapters[name]
    model_mb = pipeline.bundle.llm_path().stat().st_size / 1e6
    adapter_mb = pipeline.bundle.file(entry["file"]).stat().st_size / 1e6

    def reply(adapter: str | None) -> tuple[float, float]:
        session = pipeline.session(adapter=adapter, max_tokens=64, sampling=SamplingParams(temperature=0.0))
        for _ in session.ask(PROMPT):
            pass
        s = session.last_stats
        return s.ttft_s, s.decode_tokens_per_s

    reply(None), reply(name)  # warm-up
    switch, ttft = [], {"same": [], "switching": []}
    tps: dict[str | None, list[float]] = {None: [], name: []}
    for _ in range(args.runs):
        for adapter in (None, name):
            t = time.perf_counter()
            pipeline.use_adapter(adapter)
            switch.append(time.perf_counter() - t)
            first, rate = reply(adapter)  # the first request after a switch
            ttft["switching"].append(first)
            first, rate = reply(adapter)  # the same adapter again: its prompt prefix is reused
            ttft["same"].append(first)
            tps[adapter].append(rate)
    pipeline.close()
    med = statistics.median
    print(f"\n{args.bundle}: model {model_mb:.1f} MB, adapter {name!r} {adapter_mb:.1f} MB "
          f"({100 * adapter_mb / model_mb:.1f}% of it), {args.threads} threads, median of {args.runs}\n")
    print("| measure | value |\n|---|---|")
    print(f"| use_adapter (set + empty KV) | {1e3 * med(switch):.2f} ms |")
    print(f"| TTFT, same adapter as the last request | {1e3 * med(ttft['same']):.1f} ms |")
    print(f"| TTFT, adapter switched | {1e3 * med(ttft['switching']):.1f} ms |")
    print(f"| decode tokens/s, base | {med(tps[None]):.1f} |")
    print(f"| decode tokens/s, with {name} | {med(tps[name]):.1f} |")


if __name__ == "__main__":
    main()
