"""Spoken test audio from espeak-ng: short English sentences as 16 kHz float32 samples.

espeak-ng (`/usr/bin/espeak-ng`, Debian's `espeak-ng` package) writes 22050 Hz 16-bit mono
WAV; `load_16k` resamples it with scipy's polyphase filter (320/441 exactly). Its voice is
hard for small Whisper models, so compare engines on the same audio rather than expect
zero word errors.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

ESPEAK = "espeak-ng"
SAMPLE_RATE = 16000

SENTENCES = [
    "What is the capital of France?",
    "The weather is nice today.",
    "Please open the front door.",
    "I would like a cup of coffee.",
    "The train leaves at seven o'clock.",
    "My brother lives in London.",
    "Turn off the lights before you leave.",
    "She reads a book every night.",
    "We are going to the beach tomorrow.",
    "How much does this cost?",
    "The children are playing in the garden.",
    "Can you help me with my homework?",
    "The meeting starts in ten minutes.",
    "He forgot his keys at home.",
    "This is a very good idea.",
    "The dog is sleeping on the sofa.",
    "Where is the nearest train station?",
    "I like to listen to music.",
    "The sun rises in the east.",
    "Thank you for your help.",
    "The computer is running slowly.",
    "Let us meet after lunch.",
]


def espeak_available() -> bool:
    return shutil.which(ESPEAK) is not None


def speak(text: str, path: Path | str, voice: str = "en-us", speed: int = 140) -> Path:
    """Write `text` spoken by espeak-ng as a WAV file at `path` (espeak's own rate, 22050 Hz)."""
    path = Path(path)
    subprocess.run([ESPEAK, "-v", voice, "-s", str(speed), "-w", str(path), text],
                   check=True, capture_output=True, timeout=60)
    return path


def load_16k(path: Path | str) -> np.ndarray:
    """A 16-bit mono WAV as float32 samples in [-1, 1) at 16 kHz."""
    with wave.open(str(path)) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected 16-bit mono WAV")
        rate = w.getframerate()
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768.0
    if rate != SAMPLE_RATE:
        from scipy.signal import resample_poly

        g = math.gcd(SAMPLE_RATE, rate)
        samples = resample_poly(samples, SAMPLE_RATE // g, rate // g)
    return np.asarray(samples, dtype=np.float32)


def spoken(text: str, folder: Path | str, voice: str = "en-us", speed: int = 140) -> np.ndarray:
    """`text` spoken by espeak-ng, as 16 kHz float32 samples (the WAV is kept in `folder`)."""
    name = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")[:48]
    return load_16k(speak(text, Path(folder) / f"{name}-{voice}-{speed}.wav", voice, speed))
