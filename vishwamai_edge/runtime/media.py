"""Images and audio in chat requests: message parts, decoding, and per-request limits.

Media is decoded here, once, for every front end (terminal, UI, API). Decoding is
bounded before it starts: a part is refused unless the bundle has an encoder for
its kind, and an image's header size (an audio file's length) is charged to the
request's `MediaBudget` before any pixel (sample) is decoded, so a small body of
compressible files cannot make the device allocate gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import numpy as np

from ..errors import InputError, require
from .preprocess import rgb_array

MAX_IMAGE_PIXELS = 40_000_000  # one image (120 MB as decoded RGB)
MAX_REQUEST_PIXELS = 64_000_000  # all images of one request together
MAX_AUDIO_SECONDS = 600.0  # all audio of one request together
# Seconds alone do not bound the work: 599 s of 8 channels at 192 kHz decodes to 3.7 GB of float32,
# and a header claiming 4 GHz makes a short file "last" milliseconds while resampling takes seconds.
# So the decoded samples (frames x channels) are charged too, up to the limit's worth of 48 kHz
# stereo (230 MB as float32), and sample rates outside what audio hardware records are refused.
MAX_AUDIO_SAMPLES = int(MAX_AUDIO_SECONDS * 48_000 * 2)
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 192_000

Kind = Literal["image", "audio"]


class UnsupportedInputError(InputError):
    """An input kind (image, audio) the loaded bundle has no encoder for."""


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    pixels: np.ndarray  # (height, width, 3) uint8 RGB


@dataclass(frozen=True)
class AudioPart:
    samples: np.ndarray  # (n,) float32 mono in [-1, 1]
    sample_rate: int


Part = Union[TextPart, ImagePart, AudioPart]


class MediaBudget:
    """What one request may still decode: the kinds the bundle accepts, pixels and audio seconds."""

    def __init__(self, accepts: frozenset[str] | set[str] = frozenset({"image", "audio"}),
                 max_pixels: int = MAX_REQUEST_PIXELS, max_audio_seconds: float = MAX_AUDIO_SECONDS):
        self.accepts = frozenset(accepts)
        self.pixels_left = max_pixels
        self.seconds_left = max_audio_seconds
        self.samples_left = MAX_AUDIO_SAMPLES

    def require(self, kind: Kind) -> None:
        if kind not in self.accepts:
            raise UnsupportedInputError(
                f"this bundle has no {kind} encoder; send text only, or build a bundle from a multimodal recipe"
            )

    def charge_pixels(self, width: int, height: int) -> None:
        n = width * height
        if n > MAX_IMAGE_PIXELS:
            raise InputError(
                f"the image is {width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS // 1_000_000} megapixels"
            )
        if n > self.pixels_left:
            raise InputError(
                "the request's images are over the limit of "
                f"{MAX_REQUEST_PIXELS // 1_000_000} megapixels together; send fewer or smaller images"
            )
        self.pixels_left -= n

    def charge_audio(self, frames: int, channels: int, rate: int) -> None:
        """Charge an audio file by what its header says, before decoding it."""
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise InputError(f"the audio's sample rate is {rate} Hz; {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz is accepted")
        self.charge_seconds(frames / rate)  # first: a long recording is told of the seconds limit
        samples = frames * max(channels, 1)
        if samples > self.samples_left:
            raise InputError(f"the request's audio decodes to {samples / 1e6:.0f} million samples ({channels} channels "
                             f"at {rate} Hz), over the limit of {MAX_AUDIO_SAMPLES / 1e6:.0f} million; send a "
                             "shorter, mono or lower-rate recording")
        self.samples_left -= samples

    def charge_seconds(self, seconds: float) -> None:
        if seconds > self.seconds_left:
            raise InputError(
                f"the request's audio is over the limit of {MAX_AUDIO_SECONDS:.0f} s together "
                f"(this part is {seconds:.0f} s); send a shorter recording"
            )
        self.seconds_left -= seconds


def image_part(data: bytes, budget: MediaBudget | None = None) -> ImagePart:
    """Decode an encoded image (PNG, JPEG, WebP, ...) into RGB pixels, or raise InputError."""
    budget = budget or MediaBudget()
    budget.require("image")
    pil = require("PIL.Image", "ui")
    try:
        with pil.open(io.BytesIO(data)) as img:
            budget.charge_pixels(img.width, img.height)  # the header alone gives the size
            pixels = rgb_array(img)  # transparency onto white, as the HF processors do
    except InputError:
        raise
    except pil.UnidentifiedImageError:
        raise InputError("the data is not an image in a format Pillow reads (PNG, JPEG, WebP, GIF, BMP, ...)") from None
    except Exception as exc:  # PIL raises many kinds for truncated or corrupt data
        raise InputError(f"the image cannot be decoded (truncated or corrupt: {exc})") from None
    return ImagePart(pixels)


def audio_part(data: bytes, budget: MediaBudget | None = None) -> AudioPart:
    """Decode WAV audio (or anything soundfile reads, when installed) into mono float32."""
    budget = budget or MediaBudget()
    budget.require("audio")
    if not data:
        raise InputError("the audio is empty (0 bytes)")
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        samples, rate = _read_wav(data, budget)
    else:
        samples, rate = _read_soundfile(data, budget)
    if samples.size == 0:
        raise InputError("the audio is empty")
    return AudioPart(np.ascontiguousarray(samples, dtype=np.float32), int(rate))


def _read_wav(data: bytes, budget: MediaBudget) -> tuple[np.ndarray, int]:
    import wave

    try:
        with wave.open(io.BytesIO(data)) as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            budget.charge_audio(w.getnframes(), channels, rate)
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise InputError(f"the WAV audio cannot be read ({exc})") from None
    if width == 1:
        x = (np.frombuffer(frames, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        x = np.frombuffer(frames, "<i2").astype(np.float32) / 32768
    elif width == 3:  # 24-bit PCM: three little-endian bytes, sign-extended into an int32
        b = np.frombuffer(frames[: len(frames) - len(frames) % 3], np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 8388608
    elif width == 4:
        x = np.frombuffer(frames, "<i4").astype(np.float32) / 2147483648
    else:
        raise InputError(f"WAV audio of {width * 8}-bit samples is not supported (use 8, 16, 24 or 32-bit PCM)")
    usable = len(x) - len(x) % channels
    return x[:usable].reshape(-1, channels).mean(axis=1), rate


def _read_soundfile(data: bytes, budget: MediaBudget) -> tuple[np.ndarray, int]:
    try:
        import soundfile
    except ImportError:
        raise InputError("the audio is not a WAV file (other formats need the soundfile package)") from None
    try:
        info = soundfile.info(io.BytesIO(data))
        budget.charge_audio(info.frames, info.channels, info.samplerate)
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"the audio cannot be read ({exc})") from None
    return samples.mean(axis=1), rate


def decode_data_url(url: str, kind: Kind) -> bytes:
    """`data:<mime>;base64,<payload>` -> bytes. The device never fetches http(s) URLs: it is offline."""
    if not url.startswith("data:"):
        raise InputError(f"only data: URLs are accepted for {kind}s (base64-encoded); this server fetches nothing")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise InputError(f"the {kind} data URL must look like data:{kind}/...;base64,<data>")
    mime = header[len("data:") : -len(";base64")]
    if mime and not mime.startswith(f"{kind}/"):
        raise InputError(f"the data URL holds {mime!r}, not an {kind}")
    return decode_base64(payload, kind)


def decode_base64(payload: str, what: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"the {what} data is not valid base64") from None


def read_image(path: Path, accepts: Iterable[str], budget: MediaBudget | None = None) -> np.ndarray:
    """An image file as (H, W, 3) uint8 pixels for a bundle with encoders `accepts`, refused in one line when
    it is not one (or the bundle has no image encoder)."""
    budget = budget or MediaBudget(accepts=frozenset(accepts))
    budget.require("image")  # a text-only bundle: say so before reading the file
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file {path} does not exist")
    try:
        return image_part(path.read_bytes(), budget).pixels
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def read_audio(path: Path, accepts: Iterable[str], budget: MediaBudget | None = None) -> tuple[np.ndarray, int]:
    """An audio file (WAV; mp3/ogg/flac with soundfile) as (samples, rate) for a bundle with encoders
    `accepts`, refused in one line when it is not one."""
    budget = budget or MediaBudget(accepts=frozenset(accepts))
    budget.require("audio")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"audio file {path} does not exist")
    try:
        part = audio_part(path.read_bytes(), budget)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    return part.samples, part.sample_rate
