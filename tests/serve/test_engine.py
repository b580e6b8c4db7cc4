"""The shared engine in-process: parts, the bounded queue, cancellation, sync and async readers."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
import wave

import numpy as np
import pytest

from vishwamai_edge.errors import ContextOverflowError, InputError
from vishwamai_edge.runtime.backends import SamplingParams
from vishwamai_edge.runtime.engine import ChatRequest, Engine, EngineBusyError, EngineFailedError, Message
from vishwamai_edge.runtime.media import (
    AudioPart,
    ImagePart,
    MediaBudget,
    TextPart,
    UnsupportedInputError,
    audio_part,
    decode_data_url,
    image_part,
)
from vishwamai_edge.runtime.options import RuntimeOptions
from vishwamai_edge.runtime.pipeline import Pipeline

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def engine(embedded_bundle):
    e = Engine.load(embedded_bundle, RuntimeOptions(n_threads=1, parallel=1), max_queue=1)  # one slot: the queue fills
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
    pipeline = Pipeline.load(embedded_bundle, RuntimeOptions(n_threads=1))
    try:
        # first a different prompt, so both sides evaluate the question after the same cached prefix
        "".join(pipeline.session(max_tokens=2).ask("Hello."))
        direct = "".join(pipeline.session(max_tokens=16).ask("Name a primary colour."))
    finally:
        pipeline.close()
    assert engine.submit(ask("Name a primary colour.", 16)).text() == direct


# -- media limits --------------------------------------------------------------------------
def big_compressible_png(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (0, 0, 0)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def test_request_pixel_budget_counts_all_images():
    one = big_compressible_png(5000)  # 25 MP, a few tens of kB encoded
    assert len(one) < 200_000
    budget = MediaBudget()
    image_part(one, budget)
    image_part(one, budget)  # 50 MP so far, under 64
    with pytest.raises(InputError, match="megapixels together"):
        image_part(one, budget)  # refused from its header, before decoding


def test_media_for_a_bundle_without_encoder_is_not_decoded():
    budget = MediaBudget(accepts=frozenset())
    with pytest.raises(UnsupportedInputError, match="no image encoder"):
        image_part(b"not even an image", budget)  # refused before looking at the bytes
    with pytest.raises(UnsupportedInputError, match="no audio encoder"):
        audio_part(b"RIFF", budget)


def test_request_audio_budget_counts_all_parts():
    budget = MediaBudget(max_audio_seconds=0.15)
    audio_part(wav_bytes(channels=1, rate=8000), budget)  # 0.05 s
    audio_part(wav_bytes(channels=1, rate=8000), budget)
    with pytest.raises(InputError, match="audio is over the limit"):
        audio_part(wav_bytes(channels=1, rate=4000), budget)  # 0.1 s more


# -- cancellation --------------------------------------------------------------------------
def wait_until(cond, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_cancelled_waiting_request_frees_its_place_at_once(engine):
    long = engine.submit(ask("Write a very long story about a dragon.", 1500))
    next(iter(long))  # running now
    waiting = engine.submit(ask("hi"))
    waiting.cancel()
    assert engine.status()["waiting"] == 0  # not when the worker gets to it: now
    assert waiting.text() == "" and waiting.stats.cancelled
    again = engine.submit(ask("hi"))  # the queue of one has room again while the long one runs
    long.cancel()
    again.cancel()
    long.text()
    again.text()


def test_cancel_interrupts_a_long_prefill(engine):
    gen = engine.submit(ask("word " * 1900, 8))  # seconds of prefill on one thread
    wait_until(lambda: engine.status()["running"])
    time.sleep(0.3)
    gen.cancel()
    assert gen.text() == ""
    g = gen.stats.generation
    assert gen.stats.finish_reason == "cancelled" and g.completion_tokens == 0 and g.prefill_s == 0.0
    assert "Paris" in engine.submit(ask("What is the capital of France?", 16)).text()


def test_cancel_reaches_text_held_back_as_a_stop_prefix(engine):
    story = ask("Write a very long story about a dragon.", 200)
    full = engine.submit(story)
    text = full.text()
    assert full.stats.generation.completion_tokens == 200
    # every piece of the same greedy reply is a prefix of this stop string: nothing is ever emitted
    held = ChatRequest(story.messages, max_tokens=200, sampling=SamplingParams(), stop=(text + "\u0000",))
    gen = engine.submit(held)
    wait_until(lambda: engine.status()["running"])
    time.sleep(1.0)
    gen.cancel()
    assert gen.text() == ""
    assert gen.stats.finish_reason == "cancelled" and gen.stats.generation.completion_tokens < 200


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the dying worker, on purpose
def test_a_dead_worker_fails_every_waiting_request(embedded_bundle):
    class WorkerBug(BaseException):
        pass

    engine = Engine.load(embedded_bundle, RuntimeOptions(n_threads=1, parallel=None), max_queue=4)
    try:
        def broken_start(gen, slots):
            time.sleep(0.2)  # the second request is queued by then
            raise WorkerBug("boom")

        engine._start = broken_start
        first, second = engine.submit(ask("hi")), engine.submit(ask("hello"))
        errors = []

        def read(gen):
            try:
                gen.text()
            except EngineFailedError as exc:
                errors.append(exc)

        readers = [threading.Thread(target=read, args=(g,)) for g in (first, second)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(30)
        assert not any(t.is_alive() for t in readers), "a reader waits for a dead worker"
        assert len(errors) == 2 and "worker has stopped (WorkerBug)" in str(errors[0])
        with pytest.raises(EngineFailedError):
            engine.submit(ask("anyone?"))
        from vishwamai_edge.serve.protocol import api_error_for

        assert api_error_for(errors[0]).status == 500
    finally:
        engine.close()


# -- history -------------------------------------------------------------------------------
def test_trimmed_history_keeps_a_long_chat_going(embedded_bundle):
    engine = Engine.load(embedded_bundle, RuntimeOptions(n_ctx=256, n_threads=1, parallel=1))
    try:
        history = []
        for i in range(12):
            history += [Message.text("user", f"Tell me fact number {i} about the sea, in detail please."),
                        Message.text("assistant", "The sea is deep and wide and full of fish of every kind. " * 3)]
        turn = history + [Message.text("user", "What is the capital of France?")]
        with pytest.raises(InputError, match="context holds 256"):
            engine.submit(ChatRequest(tuple(turn), max_tokens=16)).text()
        gen = engine.submit(ChatRequest(tuple(turn), max_tokens=16, trim_history=True))
        assert "Paris" in gen.text()
        assert gen.stats.generation.dropped_messages >= 2
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "L", "I;16", "1"])
def test_every_image_mode_becomes_rgb(mode):
    from PIL import Image

    img = Image.new("RGB", (9, 7), (200, 100, 50)).convert(mode)
    if mode in ("RGBA", "LA"):
        img.putalpha(0)  # fully transparent: HF's processors put it on white
    buf = io.BytesIO()
    img.save(buf, "TIFF" if mode in ("CMYK", "I;16") else "PNG")
    part = image_part(buf.getvalue())
    assert part.pixels.shape == (7, 9, 3) and part.pixels.dtype == np.uint8
    if mode in ("RGBA", "LA"):
        assert (part.pixels == 255).all()


def test_animated_image_gives_its_first_frame():
    from PIL import Image

    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert tuple(image_part(buf.getvalue()).pixels[0, 0]) == (255, 0, 0)
