"""Whisper log-mel features in numpy against transformers 5.24's WhisperFeatureExtractor.

References and tolerances (max abs difference of the (n_mels, 3000) float32 features):
- its numpy path, `_np_extract_fbank_features` (float64 STFT, what transformers runs without
  torch; the same steps as ours): TOL_NUMPY = 1e-6; measured 6e-8 to 1.2e-7 on every case.
- `WhisperFeatureExtractor(feature_size=n)(x16k, sampling_rate=16000, return_tensors="np")`,
  which with torch installed takes its torch path (float32 STFT): TOL_TORCH = 2e-4, and no
  farther than transformers' own numpy path is from it (+1e-6). Measured 8e-7 (noise, 80 bins)
  to 8.4e-5 (sine sweep): float32 rounding of the STFT shows in the log of bins some 80 dB
  below the peak, near the max - 8 floor; speech 2e-5 to 4e-5.
Other rates: transformers accepts only 16 kHz, so the reference is given the same soxr output
that `log_mel` computes inside (soxr VHQ). soxr itself is checked against the exact answer
(sums of tones sampled at 16 kHz) and against scipy's `resample_poly`; thresholds in dB below.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from math import gcd

import numpy as np
import pytest
import soxr
import transformers as T
from scipy.signal import chirp, resample_poly
from transformers.audio_utils import mel_filter_bank

from vishwamai_edge.errors import InputError
from vishwamai_edge.runtime import audio as A
from vishwamai_edge.runtime.media import MAX_AUDIO_SECONDS, audio_part

TOL_TORCH = 2e-4
TOL_NUMPY = 1e-6
RATES = [8000, 22050, 44100, 48000]

T.utils.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def extractors():
    return {n: T.WhisperFeatureExtractor(feature_size=n) for n in A.MEL_BINS}


def reference(fe, x16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' features of 16 kHz audio: (its default torch path, its numpy path)."""
    torch_path = fe(x16, sampling_rate=16000, return_tensors="np").input_features[0]
    padded = fe.pad(T.BatchFeature({"input_features": [x16[:, None]]}), padding="max_length",
                    max_length=fe.n_samples, truncation=True)["input_features"]
    numpy_path = fe._np_extract_fbank_features(np.asarray(padded).transpose(2, 0, 1)[0], "cpu")[0]
    return torch_path, numpy_path


def assert_parity(fe, ours: np.ndarray, x16: np.ndarray) -> tuple[float, float]:
    torch_path, numpy_path = reference(fe, x16)
    assert ours.shape == (fe.feature_size, 3000) and ours.dtype == np.float32
    d_torch = float(np.abs(ours - torch_path).max())
    d_numpy = float(np.abs(ours - numpy_path).max())
    assert d_torch <= TOL_TORCH, d_torch
    assert d_torch <= float(np.abs(numpy_path - torch_path).max()) + 1e-6  # transformers' own two paths
    assert d_numpy <= TOL_NUMPY, d_numpy
    return d_torch, d_numpy


def noise(rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * rate)) * 0.1).astype(np.float32)


def sweep(rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * chirp(t, 50, t[-1], 0.45 * rate, method="logarithmic")).astype(np.float32)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """espeak-ng's en-us voice, decoded by the runtime's own WAV reader: (samples, 22050)."""
    if shutil.which("espeak-ng") is None:
        from needs import missing

        missing("espeak-ng is not installed")
    wav = tmp_path_factory.mktemp("speech") / "france.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(wav),
                    "What is the capital of France?"], check=True, capture_output=True)
    part = audio_part(wav.read_bytes())
    return part.samples, part.sample_rate


def signal(kind: str, rate: int, speech) -> np.ndarray:
    if kind == "noise":
        return noise(rate, 12.0)
    if kind == "sweep":
        return sweep(rate, 20.0)
    samples, native = speech
    if native == rate:
        return samples
    g = gcd(native, rate)  # speech at other rates: any good resampling of it is a valid input
    return resample_poly(samples, rate // g, native // g).astype(np.float32)


@pytest.mark.parametrize("n_mels", A.MEL_BINS)
def test_mel_filters_are_transformers(n_mels):
    ref = mel_filter_bank(201, n_mels, 0.0, 8000.0, 16000, norm="slaney", mel_scale="slaney")
    assert A.mel_filters(n_mels).shape == (n_mels, 201)
    assert np.abs(A.mel_filters(n_mels) - ref.T).max() <= 1e-12  # measured 0.0


@pytest.mark.parametrize("n_mels", A.MEL_BINS)
@pytest.mark.parametrize("kind", ["noise", "sweep", "speech"])
def test_parity_16k(extractors, speech, kind, n_mels):
    x16 = signal(kind, 16000, speech)
    assert_parity(extractors[n_mels], A.log_mel(x16, 16000, n_mels), x16)


@pytest.mark.parametrize("n_mels", A.MEL_BINS)
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("kind", ["noise", "sweep", "speech"])
def test_parity_resampled(extractors, speech, kind, rate, n_mels):
    x = signal(kind, rate, speech)
    x16 = soxr.resample(x, rate, 16000, quality=A.RESAMPLE_QUALITY)
    assert_parity(extractors[n_mels], A.log_mel(x, rate, n_mels), x16)


@pytest.mark.parametrize("n_mels", A.MEL_BINS)
@pytest.mark.parametrize("seconds", [0.01, 1.0, 29.99, 30.0, 45.0])
def test_padding_and_truncation(extractors, seconds, n_mels):
    x16 = noise(16000, seconds, seed=1)
    assert_parity(extractors[n_mels], A.log_mel(x16, 16000, n_mels), x16)


@pytest.mark.parametrize("n_mels", A.MEL_BINS)
def test_silence_gives_valid_features(extractors, n_mels):
    x16 = np.zeros(16000 * 5, dtype=np.float32)
    ours = A.log_mel(x16, 16000, n_mels)
    assert np.all(ours == -1.5)  # log10(1e-10) = -10, then (x + 4) / 4
    assert_parity(extractors[n_mels], ours, x16)
    assert np.all(A.log_mel(np.zeros(4410, dtype=np.float32), 44100, n_mels) == -1.5)


def tones(rate: int, n: int, freqs, phases) -> np.ndarray:
    t = np.arange(n) / rate
    return sum(0.05 * np.sin(2 * np.pi * f * t + p) for f, p in zip(freqs, phases))


def db(err: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(err**2) / np.mean(ref**2)))


@pytest.mark.parametrize("rate", RATES)
def test_resampling_against_the_exact_answer(rate):
    """Tones up to 80% of the lower Nyquist frequency: their ideal 16 kHz version is known exactly.

    Measured (error relative to the signal, max abs): soxr VHQ -150 dB / 3e-8 at 8 and 48 kHz,
    -80 dB / 4e-5 at 22.05 and 44.1 kHz; scipy's resample_poly (Kaiser, its default) -60 dB / 5e-4.
    """
    rng = np.random.default_rng(rate)
    top = 0.8 * min(rate, 16000) / 2
    freqs, phases = rng.uniform(20, top, 12), rng.uniform(0, 2 * np.pi, 12)
    x = tones(rate, 5 * rate, freqs, phases).astype(np.float32)
    ideal = tones(16000, 80000, freqs, phases)
    inner = slice(2000, 78000)  # away from the ends, where any filter sees the signal start
    ours = A.resample(x, rate)
    assert ours.dtype == np.float32 and ours.size == 80000
    err = ours[inner] - ideal[inner]
    integer_ratio = 16000 % rate == 0 or rate % 16000 == 0
    assert db(err, ideal[inner]) <= (-140 if integer_ratio else -75)
    assert np.abs(err).max() <= (1e-6 if integer_ratio else 1e-4)
    g = gcd(rate, 16000)
    poly = resample_poly(x.astype(np.float64), 16000 // g, rate // g)
    assert db(poly[inner] - ideal[inner], ideal[inner]) > db(err, ideal[inner])  # soxr is the closer one
    assert db(ours[inner] - poly[inner], ideal[inner]) <= -55  # and within resample_poly's own error


def test_16k_is_not_resampled():
    x = noise(16000, 1.0)
    assert np.array_equal(A.resample(x, 16000), x)


@pytest.mark.parametrize("n_samples, count", [
    (1, 1), (479_999, 1), (480_000, 1), (480_001, 2), (960_000, 2), (1_000_000, 3),
    (int(MAX_AUDIO_SECONDS * 16000), 20),
])
def test_window_counts(n_samples, count):
    x = np.ones(n_samples, dtype=np.float32)
    ws = A.windows(x)
    assert len(ws) == count == A.window_count(n_samples)
    assert all(w.shape == (480_000,) and w.dtype == np.float32 for w in ws)
    joined = np.concatenate(ws)
    assert np.array_equal(joined[:n_samples], x) and not joined[n_samples:].any()


def test_windows_bounded_by_the_media_budget():
    assert MAX_AUDIO_SECONDS == 600
    with pytest.raises(InputError, match="limit is 600 s"):
        A.windows(np.zeros(int(MAX_AUDIO_SECONDS * 16000) + 1, dtype=np.float32))
    with pytest.raises(InputError, match="limit is 600 s"):
        A.log_mel(np.zeros(601 * 44100, dtype=np.float32), 44100)
    assert len(A.windows(np.zeros(16000 * 10, dtype=np.float32), seconds=4)) == 3


def test_window_features_match_transformers_per_chunk(extractors):
    """A padded last window gives the features transformers computes from the bare chunk."""
    x16 = noise(16000, 65.0, seed=2)
    ws = A.windows(x16)
    assert len(ws) == 3
    for i, w in enumerate(ws):
        assert_parity(extractors[80], A.log_mel(w, 16000), x16[i * 480_000:(i + 1) * 480_000])


@pytest.mark.parametrize("rate", [16000, 8000, 22050, 48000])
def test_stream_equals_whole_recording(rate):
    x = noise(rate, 75.0, seed=3)
    rng = np.random.default_rng(4)
    stream, out, i = A.LogMelStream(rate, n_mels=128), [], 0
    while i < x.size:
        n = int(rng.integers(1, 3 * rate))
        out += stream.push(x[i:i + n])
        i += n
    out += stream.finish()
    whole = [A.log_mel(w, 16000, 128) for w in A.windows(A.resample(x, rate))]
    assert len(out) == len(whole) == 3
    assert max(float(np.abs(a - b).max()) for a, b in zip(out, whole)) == 0.0  # measured exact


def test_stream_limits_and_empty():
    stream = A.LogMelStream(16000, max_seconds=40)
    assert len(stream.push(np.zeros(16000 * 35, dtype=np.float32))) == 1
    with pytest.raises(InputError, match="limit is 40 s"):
        stream.push(np.zeros(16000 * 6, dtype=np.float32))
    empty = A.LogMelStream(48000)
    assert empty.push(np.zeros(0, dtype=np.float32)) == []
    with pytest.raises(InputError, match="the audio is empty"):
        empty.finish()


@pytest.mark.parametrize("call", [
    lambda x: A.log_mel(x, 16000), lambda x: A.log_mel(x, 44100), lambda x: A.resample(x, 8000),
    A.windows, lambda x: list(A.iter_windows(x)),
])
def test_empty_audio(call):
    with pytest.raises(InputError, match="^the audio is empty$"):
        call(np.zeros(0, dtype=np.float32))


def test_bad_inputs():
    with pytest.raises(InputError, match="one channel"):
        A.log_mel(np.zeros((1600, 2), dtype=np.float32), 16000)
    with pytest.raises(InputError, match="NaN or infinite"):
        A.log_mel(np.array([0.0, np.nan], dtype=np.float32), 16000)
    for rate in (0, -16000, 16000.5, True):
        with pytest.raises(InputError, match="sample rate"):
            A.log_mel(np.zeros(100, dtype=np.float32), rate)
    with pytest.raises(ValueError, match="80 or 128"):
        A.log_mel(np.zeros(100, dtype=np.float32), 16000, n_mels=64)


def test_float64_input_is_cast_as_transformers_does(extractors):
    x64 = noise(16000, 3.0).astype(np.float64) * 1.001
    assert_parity(extractors[80], A.log_mel(x64, 16000), x64.astype(np.float32))


def test_runtime_module_imports_no_torch():
    code = ("import sys, numpy as np, vishwamai_edge.runtime.audio as a;"
            "a.log_mel(np.ones(8000, np.float32), 8000);"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'scipy')];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
