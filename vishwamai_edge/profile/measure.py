"""One timed run of a scenario on a loaded pipeline.

Prompt scenarios feed exact token counts straight to the backend (prefill, then the
runtime's own stream loop), so every machine and quantisation sees the same work. The
chat scenario goes through `ChatSession.generate`, the path a user's message takes.

Each run starts from an empty KV cache (`reset`): the backend keeps a shared prompt prefix
between calls, which would turn every repetition after the first into a one-token prefill.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..runtime.backends import LLMBackend, SamplingParams, TokenSegment
from ..runtime.generation_stats import decode_tokens_per_s
from ..runtime.pipeline import Pipeline

GREEDY = SamplingParams(temperature=0.0)

# Plain prose, repeated to any length: the model continues it rather than ending.
FILLER = (
    "The river runs past the old mill and under the stone bridge, where the town keeps its market "
    "on Saturdays. Farmers bring apples, cheese, bread and honey; children watch the boats go by. "
    "In the evening the lamps are lit along the water and the bells of the church ring seven times. "
)


@dataclass
class RunTimings:
    prompt_tokens: int
    decode_tokens: int  # tokens generated, the first included
    tokenize_s: float  # chat template + tokenizer (0 for pre-tokenized prompts)
    encode_s: float  # image / audio encoders (0 without encoders)
    prefill_s: float
    first_token_s: float  # prefill done -> first token out (sampling, detokenizing)
    ttft_s: float
    decode_s: float  # first generated token -> last generated token
    forced_tokens: int = 0  # tokens generated past an end-of-generation the model chose
    finish: str = "length"

    @property
    def prefill_tps(self) -> float | None:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else None

    @property
    def decode_tps(self) -> float | None:
        # runtime.generation_stats.DECODE_RATE_DEFINITION: the one definition, also used by chat, ui and serve
        return decode_tokens_per_s(self.decode_tokens, self.decode_s) or None

    @property
    def context_mean(self) -> float:
        """Mean context length while decoding: what decode speed is plotted against."""
        return self.prompt_tokens + self.decode_tokens / 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(prefill_tps=self.prefill_tps, decode_tps=self.decode_tps, context_mean=self.context_mean)
        return d


def prompt_ids(llm: LLMBackend, n_tokens: int) -> list[int]:
    """Exactly n_tokens ids: BOS (if the model has one) and filler prose."""
    bos = llm.special_token("bos")
    head = [bos[0]] if bos else []
    unit = llm.tokenize(FILLER, add_special=False, parse_special=False)
    body: list[int] = []
    while len(body) < n_tokens - len(head):
        body.extend(unit)
    return head + body[: n_tokens - len(head)]


def run_prompt(llm: LLMBackend, ids: list[int], n_decode: int) -> RunTimings:
    """Prefill `ids`, then generate exactly n_decode tokens greedily."""
    llm.reset()
    t0 = time.perf_counter()
    llm.prefill([TokenSegment(ids)])
    t_prefill = time.perf_counter()
    produced: list[int] = []
    t_first = t_last = None
    for tok in llm.stream(GREEDY, n_decode):
        t_last = time.perf_counter()
        t_first = t_first or t_last
        produced.append(tok)
    forced = 0
    if len(produced) < n_decode:  # the model chose to end: keep going, or speeds would not compare
        forced = n_decode - len(produced)
        t_forced_first, t_last = _decode_past_eog(llm, ids + produced, forced, produced)
        t_first = t_first or t_forced_first
    assert t_first is not None and t_last is not None
    return RunTimings(
        prompt_tokens=len(ids),
        decode_tokens=len(produced),
        tokenize_s=0.0,
        encode_s=0.0,
        prefill_s=t_prefill - t0,
        first_token_s=t_first - t_prefill,
        ttft_s=t_first - t0,
        decode_s=t_last - t_first,
        forced_tokens=forced,
        finish="length",
    )


def _decode_past_eog(llm: LLMBackend, seq: list[int], n: int, produced: list[int]) -> tuple[float, float]:
    """Greedy steps that skip end-of-generation tokens; returns when the first and the last were picked."""
    t_first = t_last = 0.0
    for _ in range(n):
        logits = llm.logits()
        order = np.argsort(logits)[::-1]
        tok = next(int(t) for t in order if not llm.is_eog(int(t)))
        t_last = time.perf_counter()
        t_first = t_first or t_last
        produced.append(tok)
        seq.append(tok)
        llm.prefill([TokenSegment(seq)])  # re-evaluates only the new last token, as stream() would
    return t_first, t_last


def run_chat(pipeline: Pipeline, question: str, max_tokens: int) -> RunTimings:
    """One user turn through ChatSession.generate, greedy, with its own GenerationStats."""
    session = pipeline.session(sampling=GREEDY, max_tokens=max_tokens)
    messages = [*session.messages, {"role": "user", "content": question}]
    t = time.perf_counter()
    session.prompt_tokens(messages)  # template + tokenizer, timed on their own
    tokenize_s = time.perf_counter() - t
    pipeline.llm.reset()
    for _ in session.generate(messages):
        pass
    st = session.last_stats
    prefill_s = max(st.prefill_s - tokenize_s, 0.0)  # GenerationStats' prefill includes tokenizing
    return RunTimings(
        prompt_tokens=st.prompt_tokens,
        decode_tokens=st.completion_tokens,
        tokenize_s=tokenize_s,
        encode_s=0.0,
        prefill_s=prefill_s,
        first_token_s=max(st.ttft_s - st.prefill_s, 0.0),
        ttft_s=st.ttft_s,
        decode_s=st.decode_s,
        finish=st.finish_reason,
    )


def profile_image(height: int = 480, width: int = 640) -> np.ndarray:
    """A fixed photo-like test image: smooth gradients and a few shapes, the same on every machine."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    img[(x - width * 0.3) ** 2 + (y - height * 0.5) ** 2 < (height * 0.2) ** 2] = (220, 40, 40)
    img[int(height * 0.2):int(height * 0.6), int(width * 0.6):int(width * 0.85)] = (30, 60, 200)
    return img.astype(np.uint8)


def run_image(pipeline: Pipeline, question: str, max_tokens: int, image: np.ndarray) -> RunTimings:
    """One user turn with an image through ChatSession.generate: encoder time, then prefill and decode."""
    session = pipeline.session(sampling=GREEDY, max_tokens=max_tokens)
    messages = [*session.messages, {"role": "user", "content": [{"type": "image", "pixels": image},
                                                                 {"type": "text", "text": question}]}]
    t = time.perf_counter()
    session.prompt(messages)  # template + tokenizer, timed on their own
    tokenize_s = time.perf_counter() - t
    pipeline.llm.reset()
    pipeline.forget_images()  # every run encodes the image: the encoder is what is measured
    for _ in session.generate(messages):
        pass
    st = session.last_stats
    return RunTimings(
        prompt_tokens=st.prompt_tokens,
        decode_tokens=st.completion_tokens,
        tokenize_s=tokenize_s,
        encode_s=st.encode_s,
        prefill_s=max(st.prefill_s - tokenize_s - st.encode_s, 0.0),
        first_token_s=max(st.ttft_s - st.prefill_s, 0.0),
        ttft_s=st.ttft_s,
        decode_s=st.decode_s,
        finish=st.finish_reason,
    )


AUDIO_QUESTION = "What is the capital of France?"  # what the profile's clip says, when espeak-ng speaks it
CHIRP_QUESTION = "Describe this sound in one sentence."  # typed with the chirp: it has no words to hear
CHIRP_SECONDS = 5.0


@dataclass(frozen=True)
class ProfileClip:
    samples: np.ndarray  # mono float32
    sample_rate: int
    source: str  # "espeak-ng" or "chirp"
    description: str  # for the report: what the clip is
    text: str = ""  # typed with the clip ("" when the clip itself is the question)

    @property
    def seconds(self) -> float:
        return self.samples.size / self.sample_rate


def profile_clip(espeak: str | None = "espeak-ng") -> ProfileClip:
    """The audio scenario's fixed clip: the question spoken by espeak-ng (en-us, 140 words/min) when
    it is installed; otherwise a 5 s 16 kHz linear chirp (200 -> 2000 Hz), the same on every machine,
    which has no words in it, so the turn types a question beside it."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from ..runtime.media import audio_part

    exe = shutil.which(espeak) if espeak else None
    if exe:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                wav = Path(tmp) / "clip.wav"
                subprocess.run([exe, "-v", "en-us", "-s", "140", "-w", str(wav), AUDIO_QUESTION],
                               check=True, capture_output=True, timeout=60)
                part = audio_part(wav.read_bytes())
            return ProfileClip(part.samples, part.sample_rate, "espeak-ng",
                               f"espeak-ng speaking {AUDIO_QUESTION!r} ({part.samples.size / part.sample_rate:.2f} s "
                               f"at {part.sample_rate} Hz)")
        except (OSError, subprocess.SubprocessError, ValueError):
            pass  # a broken espeak-ng: fall back to the chirp
    rate = 16000
    t = np.arange(int(CHIRP_SECONDS * rate), dtype=np.float64) / rate
    f0, f1 = 200.0, 2000.0
    phase = 2 * np.pi * (f0 * t + (f1 - f0) / (2 * CHIRP_SECONDS) * t**2)
    samples = (0.3 * np.sin(phase)).astype(np.float32)
    return ProfileClip(samples, rate, "chirp",
                       f"a {CHIRP_SECONDS:.0f} s linear chirp 200-2000 Hz at {rate} Hz (espeak-ng is not installed; "
                       f"no words to hear, so {CHIRP_QUESTION!r} is typed beside it)", CHIRP_QUESTION)


def run_audio(pipeline: Pipeline, clip: ProfileClip, max_tokens: int) -> dict[str, Any]:
    """One spoken turn through ChatSession.ask(audio=...): transcription (the transcript cache
    emptied first, so every run hears the clip), then prefill and decode of the answer. A bundle
    whose audio encoder gives embeddings transcribes nothing: its encoder runs inside the prefill
    and is timed there (`encode_s`, and the real-time factor from it)."""
    session = pipeline.session(sampling=GREEDY, max_tokens=max_tokens)
    pipeline.llm.reset()
    pipeline.forget_images()  # drops cached transcripts too: the speech encoder is what is measured
    for _ in session.ask(clip.text, audio=[(clip.samples, clip.sample_rate)]):
        pass
    st = session.last_stats
    user = session.messages[-2]  # the turn as recorded: what was heard (and typed), as text
    t = time.perf_counter()
    session.prompt_tokens([user])  # template + tokenizer, timed on their own
    tokenize_s = time.perf_counter() - t
    encoder_s = st.transcribe_s + st.encode_s  # one of the two is 0: cascade or embeddings
    timings = RunTimings(
        prompt_tokens=st.prompt_tokens,
        decode_tokens=st.completion_tokens,
        tokenize_s=tokenize_s,
        encode_s=encoder_s,
        prefill_s=max(st.prefill_s - tokenize_s - st.encode_s, 0.0),
        first_token_s=max(st.ttft_s - st.prefill_s, 0.0),
        ttft_s=st.transcribe_s + st.ttft_s,  # from the clip to the first answer token
        decode_s=st.decode_s,
        finish=st.finish_reason,
    )
    d = timings.to_dict()
    d.update(
        transcribe_s=st.transcribe_s,
        audio_s=clip.seconds,
        rtf=encoder_s / clip.seconds if clip.seconds > 0 else None,
        answer_ttft_s=st.ttft_s,  # after the transcript: template, prefill, first token
        heard=list(st.heard),
        clip=clip.source,
    )
    return d
