"""The `speculative` profile scenario: the same prompts decoded plainly and with prompt-lookup drafts.

Prompt lookup pays off where the reply repeats the conversation (quoting, extraction, editing),
so the scenario runs a fixed quoting/extraction set; free chat is measured by
benchmarks/speculative.py beside it. Greedy both ways: the replies must be identical, and the
report says how many were not (a non-zero count is a bug).
"""

from __future__ import annotations

import time
from typing import Any

from ..runtime.backends import SamplingParams
from ..runtime.generation_stats import decode_tokens_per_s
from ..runtime.pipeline import Pipeline
from ..runtime.speculative import SpeculativeOptions, Speculator

PASSAGE = (
    "The lighthouse on Carrow Point was built in 1871 from granite quarried on the island. Its lamp "
    "burned whale oil until 1902, then kerosene, and since 1958 it has been electric. The last keeper, "
    "Agnes Moore, left in 1987, when the light was automated. Visitors may climb the 112 steps on "
    "weekends from May to September."
)
CONTACTS = (
    "Order 4471 ships to Priya Raman, 18 Elm Street, Leeds, LS2 9JT. Order 4472 ships to Tomas Berg, "
    "5 Harbour Road, Bergen, 5003. Order 4473 ships to Mei Chen, 220 King Street West, Toronto, M5H 1K4."
)
QUOTE_PROMPTS = (
    f"{PASSAGE}\n\nRepeat the text above exactly, word for word.",
    f"{PASSAGE}\n\nQuote the sentence about the last keeper.",
    f"{CONTACTS}\n\nList each order number with its name and full address, one order per line.",
    f"{CONTACTS}\n\nCopy the text above, replacing every street name with 'Main Street'.",
)
CHAT_PROMPTS = (
    "Write a short story about a dragon who learns to bake bread.",
    "Give me three tips for sleeping better.",
    "Explain how a bicycle stays upright.",
    "What should I pack for a weekend hiking trip?",
)
GREEDY = SamplingParams(temperature=0.0)


def decode_set(pipeline: Pipeline, prompts: tuple[str, ...], max_tokens: int,
               speculator: Speculator | None, sampling: SamplingParams = GREEDY) -> dict[str, Any]:
    """Each prompt answered from an empty KV cache; tokens, decode seconds and drafts summed."""
    tokens = drafted = accepted = prompt_tokens = 0
    decode_s = 0.0
    replies = []
    for prompt in prompts:
        session = pipeline.session(sampling=sampling, max_tokens=max_tokens, speculative=speculator or False)
        pipeline.llm.reset()
        replies.append("".join(session.generate([*session.messages, {"role": "user", "content": prompt}])))
        st = session.last_stats
        tokens += st.completion_tokens
        prompt_tokens += st.prompt_tokens
        decode_s += st.decode_s
        drafted += st.drafted_tokens
        accepted += st.accepted_tokens
    # each reply's first token comes from its prompt: (tokens - replies) decode steps' worth
    return {"tokens": tokens, "decode_s": decode_s, "replies": replies, "drafted": drafted, "accepted": accepted,
            "context_mean": (prompt_tokens + tokens / 2) / len(prompts),
            "decode_tps": decode_tokens_per_s(tokens - len(prompts) + 1, decode_s)}


def run_speculative(pipeline: Pipeline, decode_tokens: int) -> dict[str, Any]:
    """One run: the quoting set plain, then with lookup drafts."""
    lookup = Speculator.load(SpeculativeOptions(mode="lookup"), pipeline.llm)
    t = time.perf_counter()
    plain = decode_set(pipeline, QUOTE_PROMPTS, decode_tokens, None)
    spec = decode_set(pipeline, QUOTE_PROMPTS, decode_tokens, lookup)
    return {
        "prompts": len(QUOTE_PROMPTS),
        "decode_tokens": spec["tokens"],
        "context_mean": spec["context_mean"],
        "plain_decode_tps": plain["decode_tps"],
        "spec_decode_tps": spec["decode_tps"],
        "speedup": spec["decode_tps"] / plain["decode_tps"] if plain["decode_tps"] else None,
        "acceptance": spec["accepted"] / spec["drafted"] if spec["drafted"] else 0.0,
        "drafted": spec["drafted"],
        "accepted": spec["accepted"],
        "mismatches": sum(a != b for a, b in zip(plain["replies"], spec["replies"])),
        "run_s": time.perf_counter() - t,
    }


def speculative_rows(bundles: list[dict[str, Any]], fmt) -> list[list[str]]:
    """Report table rows: one per bundle that ran the scenario."""
    rows = []
    for b in bundles:
        sc = b["scenarios"].get("speculative") or {}
        s = sc.get("summary") or {}
        if sc.get("status") != "ok" or not s:
            continue
        rows.append([b["label"], fmt(s.get("acceptance"), 100, 0), fmt(s.get("plain_decode_tps"), 1, 1),
                     fmt(s.get("spec_decode_tps"), 1, 1), fmt(s.get("speedup"), 1, 2),
                     fmt(s.get("mismatches"), 1, 0, spread=False)])
    return rows


SPECULATIVE_TABLE = (
    "Speculative decoding (prompt lookup, quoting/extraction prompts, greedy)",
    ["bundle", "drafts accepted %", "plain decode tok/s", "lookup decode tok/s", "speed-up",
     "replies that differ (must be 0)"],
    "decode tok/s over the prompt set: generated tokens after each reply's first / decode seconds; the same "
    "prompts, each from an empty KV cache, plainly and then with drafts from n-grams of the conversation",
)


def speculative_bundles(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in report["bundles"]
            if ((b["scenarios"].get("speculative") or {}).get("summary") or {}).get("spec_decode_tps")]


def speculative_plot(report: dict[str, Any], figure):
    """Bars: plain and lookup decode tokens/s per bundle, acceptance written above."""
    bundles = speculative_bundles(report)
    fig = figure(max(2.2 * len(bundles) + 2.5, 6.0), 4.2)
    ax = fig.add_subplot()
    xs = range(len(bundles))
    med = [{k: (b["scenarios"]["speculative"]["summary"].get(k) or {}).get("median", 0.0)
            for k in ("plain_decode_tps", "spec_decode_tps", "acceptance", "speedup")} for b in bundles]
    ax.bar([x - 0.2 for x in xs], [m["plain_decode_tps"] for m in med], 0.4, label="plain", color="#9e9e9e")
    ax.bar([x + 0.2 for x in xs], [m["spec_decode_tps"] for m in med], 0.4, label="prompt lookup",
           color="#1f77b4")
    for x, m in zip(xs, med):
        ax.text(x + 0.2, m["spec_decode_tps"], f"x{m['speedup']:.2f}\n{m['acceptance'] * 100:.0f}% acc.",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [b["label"] for b in bundles])
    ax.set_ylabel("decode tokens/s (median)")
    ax.set_title("Speculative decoding on quoting/extraction prompts")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
