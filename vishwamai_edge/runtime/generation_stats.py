"""What a reply cost: token counts, prefill and decode times, and the one definition of decode speed."""

from __future__ import annotations

from dataclasses import dataclass, field

DECODE_RATE_DEFINITION = (
    "decode tokens/s = (generated tokens - 1) / (time of the last generated token - time of the first): "
    "the first token comes from the prompt's logits, each later one costs one decode step"
)


def decode_tokens_per_s(tokens: int, first_to_last_s: float) -> float:
    """The one definition of decode speed used everywhere (see DECODE_RATE_DEFINITION)."""
    return (tokens - 1) / first_to_last_s if tokens > 1 and first_to_last_s > 0 else 0.0


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0  # prompt evaluation, including the first sampled token's logits
    images: int = 0
    audio_clips: int = 0  # audio parts that entered the LLM as embeddings
    encode_s: float = 0.0  # image and audio encoders (inside prefill_s and ttft_s)
    heard: list[str] = field(default_factory=list)  # transcripts of the turn's audio parts
    transcribe_s: float = 0.0  # speech to text, before the prompt is built
    ttft_s: float = 0.0  # request start -> first text out
    decode_s: float = 0.0  # first generated token -> last generated token
    finish_reason: str = "stop"  # stop | length | cancelled
    dropped_messages: int = 0  # oldest turns left out so that the conversation fits the context
    speculative: str = "off"  # off | lookup | draft (speculative.py)
    drafted_tokens: int = 0  # draft tokens the target verified
    accepted_tokens: int = 0  # of them, the ones it kept

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return decode_tokens_per_s(self.completion_tokens, self.decode_s)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0
