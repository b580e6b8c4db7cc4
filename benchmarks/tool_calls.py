"""Tool calls' cost, side by side in one run: this runtime (a call grammar compiled by llguidance, masks per
token) and llama-cpp-python's own tool path (its `chatml-function-calling` chat format, which builds a GBNF
grammar from the named function's schema) on the same GGUF, questions, functions and threads.

    python benchmarks/tool_calls.py --bundle build/smollm2-135m/laptop-cpu [--threads 2] [--json out.json]

Per side, greedy, each question asked twice (the second kept): decode tokens per second (from the first
token to the last, streamed) of a reply that must call the named function, and of a free text reply to
the same prompt; the time to compile the functions' grammar; ours' mask time per token.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from constrained import side_by_side, stream_tps, timed_masks  # noqa: E402

from vishwamai_edge.runtime.backends import SamplingParams  # noqa: E402
from vishwamai_edge.runtime.options import RuntimeOptions  # noqa: E402
from vishwamai_edge.runtime.pipeline import Pipeline  # noqa: E402
from vishwamai_edge.runtime.tools import Tool  # noqa: E402

FUNCTIONS = [
    {"name": "get_weather", "description": "The current weather in a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                    "required": ["city", "unit"], "additionalProperties": False}},
    {"name": "book_table", "description": "Book a table at a restaurant.",
     "parameters": {"type": "object", "properties": {
         "restaurant": {"type": "string", "maxLength": 40}, "people": {"type": "integer", "minimum": 1, "maximum": 12},
         "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
         "notes": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3}},
         "required": ["restaurant", "people", "time", "notes"], "additionalProperties": False}},
]
QUESTIONS = {"get_weather": "What is the weather in Lisbon today?",
             "book_table": "Book a table for four at Casa Nova at 19:30, by the window, with a high chair."}
MAX_TOKENS = 96


def ours(bundle: Path, threads: int) -> dict:
    pipeline = Pipeline.load(bundle, RuntimeOptions(n_ctx=2048, n_threads=threads, parallel=1))
    tools = [Tool(f["name"], f["description"], f["parameters"]) for f in FUNCTIONS]
    compile_ms, plain, called, mask_us = [], [], [], []
    try:
        pipeline.compile_schema({"type": "object"})  # reads the vocabulary once
        with timed_masks() as spent:
            run_questions(pipeline, tools, compile_ms, plain, called, mask_us, spent)
    finally:
        pipeline.close()
    return {"compile_ms": round(statistics.mean(compile_ms), 2), "plain_tps": round(statistics.mean(plain), 1),
            "call_tps": round(statistics.mean(called), 1), "mask_us_per_token": round(statistics.mean(mask_us), 1)}


def run_questions(pipeline: Pipeline, tools: list[Tool], compile_ms: list, plain: list, called: list,
                  mask_us: list, spent: list) -> None:
    for name, question in QUESTIONS.items():
        t = time.perf_counter()
        use = pipeline.tool_use(tools, choice=name)
        compile_ms.append((time.perf_counter() - t) * 1e3)
        # the free reply gets the same prompt: the functions listed as the call's prompt lists them
        messages, _ = use.messages_for_template([{"role": "user", "content": question}])
        for target, tools_use in ((plain, None), (called, use)):
            for _ in range(2):
                session = pipeline.session(tools=tools_use, max_tokens=MAX_TOKENS, sampling=SamplingParams(),
                                           speculative=False, system_prompt=None)
                spent[:] = [0.0, 0]
                text = "".join(session.generate(messages if tools_use is None else messages[1:]))
            target.append(session.last_stats.decode_tokens_per_s)
            if tools_use is not None:
                mask_us.append(spent[0] / max(spent[1], 1) * 1e6)
                print(f"  ours {name}: {text!r}", file=sys.stderr)


def llama_cpp_python(gguf: Path, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=2048, n_threads=threads, verbose=False, chat_format="chatml-function-calling")
    tools = [{"type": "function", "function": f} for f in FUNCTIONS]
    plain, called = [], []
    for name, question in QUESTIONS.items():
        messages = [{"role": "user", "content": question}]
        for target, choice in ((plain, "none"), (called, {"type": "function", "function": {"name": name}})):
            for _ in range(2):
                pieces: list[str] = []
                chunks = llm.create_chat_completion(messages, tools=tools, tool_choice=choice, stream=True,
                                                    max_tokens=MAX_TOKENS, temperature=0)
                tps = stream_tps(pieces.append(p) or p for p in map(_piece, chunks))
                text = "".join(pieces)
            target.append(tps)
            if choice != "none":
                print(f"  llama-cpp-python {name}: {text!r}", file=sys.stderr)
    llm.close()
    return {"plain_tps": round(statistics.mean(plain), 1), "call_tps": round(statistics.mean(called), 1)}


def _piece(chunk: dict) -> str:
    """A streamed chunk's text: content, or a call's argument fragment."""
    delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
    return delta.get("content") or "".join(c["function"]["arguments"] or "" for c in delta.get("tool_calls") or [])


def _line(side: str, r: dict) -> str:
    ratio = r["call_tps"] / r["plain_tps"] if r["plain_tps"] else float("nan")
    return (f"decode tok/s free reply {r['plain_tps']:>6.1f}  forced call {r['call_tps']:>6.1f} ({ratio:.0%})"
            + (f"  grammar compile {r['compile_ms']:.1f} ms  mask {r['mask_us_per_token']:.0f} us/token"
               if side == "ours" else ""))


def main() -> None:
    side_by_side(__doc__, ours, llama_cpp_python, _line)


if __name__ == "__main__":
    main()
