"""The shared engine in-process: parts, the bounded queue, cancellation, sync and async readers."""

from __future__ import annotations

import asyncio
import base64
import io
import time
import wave

import numpy as np
import pytest

from vishwamai_edge.errors import ContextOverflowError, InputError
from vishwamai_edge.runtime.backends import SamplingParams
from vishwamai_edge.runtime.engine import (
    AudioPart,
    ChatRequest,
    Engine,
    EngineBusyError,
    ImagePart,
    Message,
    TextPart,
    UnsupportedInputError,
    audio_part,
    decode_data_url,
    image_part,
)
from vishwamai_edge.runtime.session import Pipeline

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def engine(embedded_bundle):
    e = Engine.load(embedded_bundle, n_threads=1, max_queue=1)
    yield e
    e.close()


def ask(text: str, max_tokens: int = 8) -> ChatRequest:
    return ChatRequest((Message.text("user", text),), max_tokens=max_tokens, sampling=SamplingParams())


def png_bytes(size=(12, 8)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def wav_bytes(channels: int = 2, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    frames = np.array([[16384, -16384]] * 400, dtype="<i2")[:, :channels]
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames.tobytes())
    return buf.getvalue()


# -- parts ---------------------------------------------------------------------------------
def test_image_part_decodes_rgb_pixels():
    part = image_part(png_bytes((12, 8)))
    assert part.pixels.shape == (8, 12, 3) and part.pixels.dtype == np.uint8
    assert tuple(part.pixels[0, 0]) == (10, 200, 30)


@pytest.mark.parametrize("data", [b"", b"hello", png_bytes()[:40]])
def test_broken_images_are_input_errors(data):
    with pytest.raises(InputError, match="image"):
        image_part(data)


def test_audio_part_mixes_to_mono_float():
    part = audio_part(wav_bytes(channels=2, rate=8000))
    assert part.sample_rate == 8000 and part.samples.dtype == np.float32 and part.samples.shape == (400,)
    assert np.abs(part.samples).max() == 0.0  # +0.5 and -0.5 average out
    assert audio_part(wav_bytes(channels=1)).samples[0] == pytest.approx(0.5)
    with pytest.raises(InputError, match="WAV"):
        audio_part(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")


def test_data_urls():
    raw = png_bytes()
    assert decode_data_url("data:image/png;base64," + base64.b64encode(raw).decode(), "image") == raw
    for bad, match in [("http://x/y.png", "only data: URLs"), ("data:image/png,abc", "base64"),
                       ("data:text/plain;base64,aGk=", "not an image"), ("data:image/png;base64,@@", "base64")]:
        with pytest.raises(InputError, match=match):
            decode_data_url(bad, "image")


# -- engine --------------------------------------------------------------------------------
def test_image_and_audio_refused_without_encoders(engine):
    for part, kind in [(ImagePart(np.zeros((4, 4, 3), np.uint8)), "image"),
                       (AudioPart(np.zeros(16, np.float32), 16000), "audio")]:
        req = ChatRequest((Message("user", (TextPart("what is this?"), part)),))
        with pytest.raises(UnsupportedInputError, match=f"no {kind} encoder"):
            engine.submit(req)


def test_sync_and_async_readers_agree(engine):
    text = engine.submit(ask("What is the capital of France?", 16)).text()
    assert "Paris" in text

    async def read() -> tuple[str, int]:
        gen = engine.submit(ask("What is the capital of France?", 16))
        pieces = [p async for p in gen.astream()]
        return "".join(pieces), len(pieces)

    async_text, n = asyncio.run(read())
    assert async_text == text and n > 1


def test_bounded_queue_and_cancellation(engine):
    long = engine.submit(ask("Write a very long story about a dragon.", 1500))
    first = next(iter(long))  # running now
    assert first
    waiting = engine.submit(ask("hi"))  # the queue holds one
    with pytest.raises(EngineBusyError, match="busy"):
        engine.submit(ask("hi"))
    waiting.cancel()  # dropped before it starts
    long.cancel()
    rest = "".join(long)
    assert long.stats.finish_reason == "cancelled" and long.stats.generation.completion_tokens < 1500
    assert first + rest and waiting.text() == "" and waiting.stats.cancelled
    deadline = time.monotonic() + 30
    while engine.status()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.status()["waiting"] == 0
    assert "Paris" in engine.submit(ask("What is the capital of France?", 16)).text()  # still serves


def test_request_errors_arrive_through_the_stream(engine):
    gen = engine.submit(ask("word " * 3000))
    with pytest.raises(ContextOverflowError, match="context holds"):
        gen.text()
    assert engine.submit(ask("Say hi.", 4)).text()


def test_engine_answers_like_chat_session(engine, embedded_bundle):
    # Same pipeline code path: the engine adds queueing, not different text.
    pipeline = Pipeline.load(embedded_bundle, n_threads=1)
    try:
        # first a different prompt, so both sides evaluate the question after the same cached prefix
        "".join(pipeline.session(max_tokens=2).ask("Hello."))
        direct = "".join(pipeline.session(max_tokens=16).ask("Name a primary colour."))
    finally:
        pipeline.close()
    assert engine.submit(ask("Name a primary colour.", 16)).text() == direct
