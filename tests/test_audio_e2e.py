"""Speech end to end with real weights: the embedded SmolLM2 + the shipped Whisper tiny.en, built by
recipes/smollm2-135m-whisper.yaml; espeak-ng speaks, the bundle hears and answers."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest
import speech
from speech_bundles import QUESTION, question_wav, speech_bundle  # noqa: F401  (shared session fixtures)
from test_whisper_source import (  # noqa: F401  (session fixtures shared with the source's tests)
    ct2_dir,
    ct2_model,
    features,
    hf_dir,
    hf_model,
    transcripts,
    word_error_rate,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def pipeline(speech_bundle):
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    p = Pipeline.load(speech_bundle, RuntimeOptions(n_threads=2))
    yield p
    p.close()


def test_onnx_transcripts_equal_ctranslate2s(pipeline, features, transcripts):
    """The bundle's ONNX Whisper on the same features as ctranslate2, sentence by sentence."""
    whisper = pipeline.encoders["audio"].whisper
    ours = [whisper.transcribe(f) for f in features]
    same = sum(a.strip() == b.strip() for a, b in zip(ours, transcripts["ct2"]))
    ours_wer = np.mean([word_error_rate(h, r) for h, r in zip(ours, speech.SENTENCES)])
    ct2_wer = np.mean([word_error_rate(h, r) for h, r in zip(transcripts["ct2"], speech.SENTENCES)])
    print(f"\nidentical to ctranslate2: {same}/{len(ours)}; WER ours {ours_wer:.3f}, ctranslate2 {ct2_wer:.3f}")
    assert len(ours) >= 20
    assert same == len(ours) or abs(ours_wer - ct2_wer) <= 0.01


def test_the_device_front_end_hears_like_ctranslate2(pipeline, transcripts, tmp_path):
    """Raw espeak audio at its own 22050 Hz -> our soxr + numpy log-mel -> ONNX, against ctranslate2
    on transformers' features of the same sentences: espeak's voice is hard for tiny.en, so the
    word error rates are compared, not held to zero."""
    encoder = pipeline.encoders["audio"]
    n = 8
    ours = []
    for text in speech.SENTENCES[:n]:
        samples, rate = _read(speech.speak(text, tmp_path / "s.wav"))
        ours.append(word_error_rate(encoder.transcribe(samples, rate), text))
    theirs = [word_error_rate(h, r) for h, r in zip(transcripts["ct2"][:n], speech.SENTENCES)]
    print(f"\nWER, device front end {np.mean(ours):.3f}, ctranslate2 {np.mean(theirs):.3f}")
    assert ours[0] == 0.0  # "What is the capital of France?" is heard exactly
    assert np.mean(ours) <= np.mean(theirs) + 0.05


def _read(path: Path) -> tuple[np.ndarray, int]:
    from vishwamai_edge.runtime.media import audio_part

    part = audio_part(path.read_bytes())
    return part.samples, part.sample_rate


def test_spoken_question_answered_in_a_session(pipeline, question_wav):
    session = pipeline.session(max_tokens=32)
    answer = "".join(session.ask("", audio=[_read(question_wav)]))
    assert session.last_stats.heard == [QUESTION] and "Paris" in answer
    assert session.messages[0]["content"] == QUESTION  # the history keeps what was heard, as text


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_chat_audio_command(speech_bundle, question_wav):
    proc = cli("chat", str(speech_bundle), "--audio", str(question_wav), "--max-tokens", "32", "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    assert f"heard: {QUESTION}" in proc.stderr and "Paris" in proc.stdout


@pytest.fixture(scope="module")
def server(speech_bundle, tmp_path_factory):
    from serve_process import start_server, stop_server

    live = start_server(speech_bundle, tmp_path_factory.mktemp("serve") / "server.log")
    yield live
    stop_server(live)


def test_input_audio_through_the_api_is_answered(server, question_wav):
    from openai import OpenAI

    data = base64.b64encode(question_wav.read_bytes()).decode()
    with OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=300) as client:
        stream = client.chat.completions.create(
            model=server.model, max_tokens=32, temperature=0, stream=True,
            messages=[{"role": "user", "content": [{"type": "input_audio",
                                                    "input_audio": {"data": data, "format": "wav"}}]}])
        chunks = list(stream)
        answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Paris" in answer
        assert chunks[0].model_extra["vishwamai_edge"]["heard"] == [QUESTION]
        with open(question_wav, "rb") as f:
            text = client.audio.transcriptions.create(model="whisper-1", file=f).text
    assert text == QUESTION


def wav_bytes(samples: np.ndarray, rate: int = 16000, width: int = 2, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    x = np.repeat(samples[:, None], channels, axis=1)
    if width == 1:
        raw = (x * 127 + 128).astype(np.uint8).tobytes()
    elif width == 2:
        raw = (x * 32767).astype("<i2").tobytes()
    else:  # 24-bit
        i = (x.reshape(-1) * 8388607).astype("<i4")
        raw = np.stack([i & 255, (i >> 8) & 255, (i >> 16) & 255], axis=1).astype(np.uint8).tobytes()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return buf.getvalue()


def transcribe(server, data: bytes, name: str = "a.wav") -> httpx.Response:
    return httpx.post(server.base_url + "/audio/transcriptions", files={"file": (name, data, "audio/wav")},
                      data={"model": "whisper-1"}, timeout=300)


def test_pcm_kinds_are_heard_alike(server, question_wav):
    samples, rate = _read(question_wav)
    for width, channels in ((1, 1), (2, 2), (3, 1)):  # 8-bit, 16-bit stereo, 24-bit
        r = transcribe(server, wav_bytes(samples, rate, width, channels))
        assert r.status_code == 200, r.text
        assert word_error_rate(r.json()["text"], QUESTION) <= 0.2, (width, channels, r.json())


@pytest.mark.parametrize("data, message", [
    (b"this is not audio at all", "audio cannot be read|not a WAV file"),
    (None, "WAV audio cannot be read"),  # a truncated WAV: filled in below
    (b"", "empty"),
    (b"zero-frames", "empty"),  # a valid WAV header with no samples: filled in below
])
def test_bad_audio_is_a_400_and_the_server_goes_on(server, question_wav, data, message):
    if data is None:
        data = question_wav.read_bytes()[:30]
    elif data == b"zero-frames":
        data = wav_bytes(np.zeros(0, np.float32))
    r = transcribe(server, data)
    assert r.status_code == 400 and any(m in r.json()["error"]["message"] for m in message.split("|")), r.text
    assert transcribe(server, question_wav.read_bytes()).json()["text"] == QUESTION


def test_two_hours_are_refused_from_the_header_and_silence_is_heard_as_nothing(server):
    # a WAV header that announces two hours: refused before its samples are read
    header = bytearray(wav_bytes(np.zeros(16, np.float32)))
    two_hours = 2 * 3600 * 16000 * 2
    header[40:44] = two_hours.to_bytes(4, "little")  # the data chunk's size
    header[4:8] = (two_hours + 36).to_bytes(4, "little")
    r = transcribe(server, bytes(header) + b"\0" * 64000)
    assert r.status_code == 400 and "limit of 600 s" in r.json()["error"]["message"], r.text
    r = transcribe(server, wav_bytes(np.zeros(16000 * 3, np.float32)))
    assert r.status_code == 200 and len(r.json()["text"]) < 20  # three seconds of silence


def test_profile_audio_scenario(speech_bundle, tmp_path):
    """`profile`'s audio scenario on the speech bundle: the clip is heard (espeak-ng here), the
    transcription time and its real-time factor are reported beside ttft and decode speed."""
    from rich.console import Console

    from vishwamai_edge.profile.runner import run_profile
    from vishwamai_edge.runtime.options import RuntimeOptions

    res = run_profile([speech_bundle], tmp_path / "profile", scenarios="audio", repeat=2, warmup=1, decode_tokens=16, console=Console(stderr=True, quiet=True), options=RuntimeOptions(n_threads=2))
    sc = res.report["bundles"][0]["scenarios"]["audio"]
    assert sc["status"] == "ok", sc.get("error")
    assert sc["clip"]["source"] == "espeak-ng" and sc["clip"]["seconds"] > 0
    assert len(sc["runs"]) == 2
    for run in sc["runs"]:
        assert run["transcribe_s"] > 0 and run["rtf"] == pytest.approx(run["transcribe_s"] / run["audio_s"])
        assert run["heard"] == [QUESTION]
        assert run["ttft_s"] > run["transcribe_s"] and run["decode_tps"] > 0
    summary = sc["summary"]
    assert summary["rtf"]["median"] > 0 and summary["transcribe_s"]["n"] == 2
    print(f"\naudio: {sc['clip']['description']}; transcribe {summary['transcribe_s']['median']:.3f} s, "
          f"RTF {summary['rtf']['median']:.3f}, ttft {summary['ttft_s']['median'] * 1000:.0f} ms, "
          f"decode {summary['decode_tps']['median']:.1f} tokens/s")
    assert any("real-time factor" in n and "espeak-ng" in n for n in res.report["notes"])
    assert "audio" in (tmp_path / "profile" / "report.md").read_text()
