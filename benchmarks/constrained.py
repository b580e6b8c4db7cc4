"""Constrained decoding's cost, side by side in one run: this runtime (llguidance masks) and llama-cpp-python's
own grammar path (its JSON-schema-to-GBNF converter and llama.cpp's grammar sampler) on the same GGUF,
prompts and threads.

    python benchmarks/constrained.py --bundle build/smollm2-135m/laptop-cpu [--threads 2] [--json out.json]

Per side, greedy, the same chat prompts: decode tokens/s unconstrained and constrained (tokens after the
first / time from the first token to the last); the time to compile a schema (ours: after the vocabulary
is read once, which is timed apart); and ours' mask time per token (the grammar's share of a step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vishwamai_edge.runtime.backends import SamplingParams  # noqa: E402
from vishwamai_edge.runtime.constrained import GrammarState  # noqa: E402
from vishwamai_edge.runtime.options import RuntimeOptions  # noqa: E402
from vishwamai_edge.runtime.pipeline import Pipeline  # noqa: E402

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24}, "hobbies": {"type": "array", "items": {"type": "string",
                                                                                          "maxLength": 16},
                                                                "maxItems": 3}},
        "required": ["name", "age", "city", "hobbies"], "additionalProperties": False},
    "order": {"type": "object", "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {"enum": ["apple", "pear", "plum", "fig"]}},
        "total": {"type": "number", "minimum": 0, "maximum": 100}, "paid": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 40}},
        "required": ["items", "total", "paid", "note"], "additionalProperties": False},
}
PROMPTS = {"person": "Make up a person as JSON: name, age, city and hobbies.",
           "order": "Write a fruit order as JSON with a note."}
MAX_TOKENS = 96


@contextmanager
def timed_masks() -> Iterator[list[float]]:
    """[seconds, calls] of every grammar mask computed inside the block (reset it per reply)."""
    original, spent = GrammarState.mask, [0.0, 0]

    def timed(self, logits):
        t0 = time.perf_counter()
        original(self, logits)
        spent[0] += time.perf_counter() - t0
        spent[1] += 1

    GrammarState.mask = timed
    try:
        yield spent
    finally:
        GrammarState.mask = original


def stream_tps(pieces: Iterable[str]) -> float:
    """Decode tokens/s of a stream of one token a piece: pieces after the first over the time they took."""
    first, last, n = None, None, 0
    for piece in pieces:
        if piece:
            now = time.perf_counter()
            first, last, n = first or now, now, n + 1
    return (n - 1) / (last - first) if n > 1 else 0.0


def bundle_args(doc: str) -> tuple[argparse.Namespace, Path]:
    """--bundle, --threads, --json; and the bundle's GGUF, for the peer."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    return args, args.bundle / json.loads((args.bundle / "manifest.json").read_text())["llm"]["file"]


def ours(bundle: Path, threads: int) -> dict:
    pipeline = Pipeline.load(bundle, RuntimeOptions(n_ctx=2048, n_threads=threads, parallel=1))
    try:
        t = time.perf_counter()
        pipeline.compile_schema({"type": "object"})  # reads the vocabulary once
        vocab_s = time.perf_counter() - t
        compile_ms, plain, constrained, mask_us = [], [], [], []
        with timed_masks() as spent:
            mask_us = run_schemas(pipeline, compile_ms, plain, constrained, spent)
    finally:
        pipeline.close()
    return {"vocabulary_read_s": round(vocab_s, 3), "compile_ms": round(statistics.mean(compile_ms), 2),
            "plain_tps": round(statistics.mean(plain), 1), "constrained_tps": round(statistics.mean(constrained), 1),
            "mask_us_per_token": round(statistics.mean(mask_us), 1)}


def run_schemas(pipeline: Pipeline, compile_ms: list, plain: list, constrained: list, spent: list) -> list[float]:
    mask_us = []
    for name, schema in SCHEMAS.items():
        t = time.perf_counter()
        grammar = pipeline.compile_schema(schema)
        compile_ms.append((time.perf_counter() - t) * 1e3)
        for target, g in ((plain, None), (constrained, grammar)):
            for _ in range(2):  # the first warms caches; the second is kept
                session = pipeline.session(grammar=g, max_tokens=MAX_TOKENS, sampling=SamplingParams(),
                                           speculative=False)
                spent[:] = [0.0, 0]
                "".join(session.ask(PROMPTS[name]))
            target.append(session.last_stats.decode_tokens_per_s)
            if g is not None:
                mask_us.append(spent[0] / max(spent[1], 1) * 1e6)
    return mask_us


def llama_cpp_python(gguf: Path, threads: int) -> dict:
    from llama_cpp import Llama, LlamaGrammar

    llm = Llama(str(gguf), n_ctx=2048, n_threads=threads, verbose=False)
    compile_ms, plain, constrained = [], [], []
    for name, schema in SCHEMAS.items():
        t = time.perf_counter()
        grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        compile_ms.append((time.perf_counter() - t) * 1e3)
        messages = [{"role": "user", "content": PROMPTS[name]}]
        for target, g in ((plain, None), (constrained, grammar)):
            for _ in range(2):
                chunks = llm.create_chat_completion(messages, max_tokens=MAX_TOKENS, temperature=0, grammar=g,
                                                    stream=True)
                tps = stream_tps(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            target.append(tps)
    llm.close()
    return {"compile_ms": round(statistics.mean(compile_ms), 2), "plain_tps": round(statistics.mean(plain), 1),
            "constrained_tps": round(statistics.mean(constrained), 1)}


def side_by_side(doc: str, ours: Callable[[Path, int], dict], peer: Callable[[Path, int], dict],
                 line: Callable[[str, dict], str]) -> None:
    """Both sides run in one process, one after the other; a line each, and --json the numbers."""
    args, gguf = bundle_args(doc)
    result = {"ours": ours(args.bundle, args.threads), "llama_cpp_python": peer(gguf, args.threads)}
    for side, r in result.items():
        print(f"{side:<18} {line(side, r)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def _line(side: str, r: dict) -> str:
    ratio = r["constrained_tps"] / r["plain_tps"] if r["plain_tps"] else float("nan")
    return (f"decode tok/s plain {r['plain_tps']:>6.1f}  constrained {r['constrained_tps']:>6.1f}  ({ratio:.0%})"
            f"  schema compile {r['compile_ms']:.1f} ms"
            + (f"  mask {r['mask_us_per_token']:.0f} us/token  vocabulary read once {r['vocabulary_read_s']:.2f} s"
               if side == "ours" else ""))


def main() -> None:
    side_by_side(__doc__, ours, llama_cpp_python, _line)


if __name__ == "__main__":
    main()
