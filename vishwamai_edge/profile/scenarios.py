"""The fixed scenario set of `vishwamai-edge profile`.

Every machine runs the same scenarios with the same prompt lengths, so a laptop, an x86
CUDA PC and a Jetson give numbers that sit in one table. Encoder scenarios (an image, an
audio clip) run only when the bundle's manifest lists encoders; otherwise they are
reported as skipped with the reason, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..runtime.manifest import EncoderEntry, Manifest

CHAT_QUESTION = "What is the capital of France? Answer in one sentence."
IMAGE_QUESTION = "Describe this picture in one sentence."
RUNNABLE_ENCODERS = ("image", "audio")


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # chat | prompt | image | audio | concurrency | overhead
    description: str
    prompt_tokens: int = 0  # exact length for "prompt" and "overhead"; 0 = what the chat template makes
    decode_tokens: int = 64  # tokens generated after the prompt
    encoder: str | None = None  # manifest encoders key this scenario needs

    def context_needed(self, decode_tokens: int, image_rows: int = 0) -> int:
        if self.kind == "image":  # the image's encoder rows, the template and the question
            return image_rows + 64 + decode_tokens
        if self.kind == "audio":  # the template and what was heard (a short spoken question)
            return 64 + decode_tokens
        return self.prompt_tokens + decode_tokens + 8


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("chat", "chat", "one short chat turn through ChatSession (template, prefill, streaming)"),
        Scenario("prompt-512", "prompt", "a 512-token prompt, then a fixed number of decoded tokens", 512),
        Scenario("prompt-1024", "prompt", "a 1024-token prompt, then a fixed number of decoded tokens", 1024),
        Scenario("prompt-2048", "prompt", "a 2048-token prompt, then a fixed number of decoded tokens", 2048),
        Scenario("image", "image", "one 640x480 image through the image encoder, then an answer",
                 encoder="image"),
        Scenario("audio", "audio", "one spoken clip heard by the speech encoder (ChatSession.ask(audio=...)), "
                 "then an answer", encoder="audio"),
        Scenario("speculative", "speculative",
                 "quoting/extraction prompts decoded plainly and with prompt-lookup drafts (greedy): "
                 "acceptance, decode tokens/s both ways, speed-up", 192),
        Scenario("concurrency", "concurrency", "1, 2, 4, 8 and 16 clients at once through the serving engine "
                 "(continuous batching): aggregate and per-stream tokens/s, TTFT"),
        Scenario(
            "overhead", "overhead",
            "same GGUF, prompt and threads: this runtime's decode loop against raw llama-cpp-python", 128,
        ),
    ]
}

DEFAULT_SCENARIOS = list(SCENARIOS)
SHORT_SCENARIOS = ["chat", "prompt-512"]  # what tests and quick checks run
SECOND_COPY = ("concurrency", "overhead")  # scenarios that load the model again, in the order they run


@dataclass(frozen=True)
class PlannedScenario:
    scenario: Scenario
    skip_reason: str | None = None


def parse_names(spec: str | list[str] | None) -> list[str]:
    """'chat,prompt-512' or a list -> validated names, in the order given; None -> all."""
    if spec is None:
        return list(DEFAULT_SCENARIOS)
    items = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    names = [n.strip() for n in items if n.strip()]
    if names in (["all"], []):
        return list(DEFAULT_SCENARIOS)
    if names == ["short"]:
        return list(SHORT_SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise UserError(f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}, all, short")
    names = list(dict.fromkeys(names))
    # these load a second copy of the model: run them last, so the bundle's own peak RSS is clean
    return [n for n in names if n not in SECOND_COPY] + [n for n in SECOND_COPY if n in names]


def plan(
    names: list[str], manifest: Manifest, n_ctx: int, decode_tokens: int
) -> list[PlannedScenario]:
    """Which of `names` run on this bundle, and why each of the others does not."""
    encoders, backend = manifest.encoders, manifest.llm.backend
    out = []
    for name in names:
        s = SCENARIOS[name]
        reason = None
        if s.encoder and s.encoder not in encoders:
            reason = f"the bundle has no {s.encoder} encoder (its manifest lists no encoders.{s.encoder})"
        elif s.encoder and s.encoder not in RUNNABLE_ENCODERS:
            reason = f"the bundle has a {s.encoder} encoder but this runtime cannot run it yet"
        elif s.kind == "speculative" and backend != "llamacpp":
            reason = f"speculative decoding runs on the llama.cpp backend, not {backend}"
        elif s.kind == "overhead" and backend != "llamacpp":
            reason = f"the comparison with raw llama-cpp-python needs a llama.cpp bundle, not {backend}"
        elif s.kind == "concurrency" and backend != "llamacpp":
            reason = f"several streams in one context need the llama.cpp backend, not {backend}"
        elif s.context_needed(decode_tokens, _image_rows(encoders)) > n_ctx:
            need = s.context_needed(decode_tokens, _image_rows(encoders))
            reason = f"needs a context of {need} tokens, the profile uses {n_ctx} (--n-ctx)"
        out.append(PlannedScenario(s, reason))
    return out


def _image_rows(encoders: dict[str, EncoderEntry]) -> int:
    entry = encoders.get("image")
    return entry.n_tokens or 0 if entry is not None else 0


def context_for(names: list[str], decode_tokens: int, image_rows: int = 0) -> int:
    """The smallest context, in steps of 256 tokens, that fits every prompt scenario in `names`
    (`image_rows`: the largest image encoder's rows per image among the bundles)."""
    need = max([SCENARIOS[n].context_needed(decode_tokens, image_rows) for n in names] + [512])
    return -(-need // 256) * 256
