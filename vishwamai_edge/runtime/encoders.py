"""Encoders on the device: ONNX Runtime sessions over the graphs `export/onnx` writes.

A vision graph takes `pixel_values` (batch, 3, H, W) float32 and returns `image_embeds`
(batch, tokens, llm_hidden), already in the language model's width, so its rows can
be spliced into the prompt as they are. An audio graph in embeddings mode does the same
from Whisper's log-mel (`input_features` -> `audio_embeds`); a speech-to-text bundle's
audio encoder instead transcribes (`SpeechEncoder`, the cascade).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import BundleError, InputError
from .onnx_session import Provider, ort_session

INPUT, OUTPUT = "pixel_values", "image_embeds"

class Encoder(Protocol):
    """What the pipeline needs from any encoder (vision now, audio later)."""

    providers: list[str]

    def encode(self, features: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class VisionEncoder:
    """One vision tower + projector graph in an ONNX Runtime session."""

    def __init__(self, session: Any, path: Path):
        self.session = session
        self.path = path
        self.providers: list[str] = list(session.get_providers())  # what ORT really uses
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        if INPUT not in inputs or OUTPUT not in outputs:
            raise BundleError(
                f"{path} is not a vision encoder graph (needs input {INPUT!r} and output {OUTPUT!r})"
            )
        shape = inputs[INPUT].shape  # [batch, 3, H, W]; H, W fixed at export
        self.image_size: tuple[int, int] | None = (
            (shape[2], shape[3]) if isinstance(shape[2], int) and isinstance(shape[3], int) else None
        )
        out_shape = outputs[OUTPUT].shape  # [batch, tokens, hidden]
        self.n_tokens: int | None = out_shape[1] if isinstance(out_shape[1], int) else None
        self.hidden: int | None = out_shape[2] if isinstance(out_shape[2], int) else None

    @classmethod
    def load(cls, path: Path | str, providers: Sequence[Provider] | None = None,
             threads: int | None = None) -> VisionEncoder:
        path = Path(path)
        session = ort_session(path, providers, threads, "vision encoder")
        return cls(session, path)

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """(n, 3, H, W) float32 -> (n, tokens, hidden) float32."""
        x = np.asarray(pixel_values)
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"pixel values must be (n, 3, H, W), got shape {x.shape}")
        if self.image_size and tuple(x.shape[2:]) != self.image_size:
            raise InputError(f"this encoder takes {self.image_size[0]}x{self.image_size[1]} images, "
                             f"got {x.shape[2]}x{x.shape[3]}")
        out = self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        self.session = None


class ImageEncoder:
    """A bundle's image encoder: numpy preprocessing, then the ONNX graph.
    Decoded images in, one (tokens, llm_hidden) block of embedding rows per image out."""

    def __init__(self, vision: VisionEncoder, spec: Any, n_tokens: int, hidden: int):
        self.vision = vision
        self.spec = spec
        self.n_tokens = n_tokens
        self.hidden = hidden

    @property
    def providers(self) -> list[str]:
        return self.vision.providers

    @classmethod
    def from_manifest(cls, path: Path, entry: dict[str, Any], threads: int | None = None,
                      providers: Sequence[Provider] | None = None) -> ImageEncoder:
        """`entry` is the manifest's `encoders.image` (export.onnx's VisionExportInfo.to_dict())."""
        from .preprocess import ImageProcessorSpec

        try:
            spec = ImageProcessorSpec.from_dict(entry["preprocess"])
            n_tokens, hidden = int(entry["n_tokens"]), int(entry["hidden"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"the manifest's image encoder entry is incomplete ({exc})") from None
        vision = VisionEncoder.load(path, providers or entry.get("providers"), threads)
        if (vision.n_tokens, vision.hidden) not in ((n_tokens, hidden), (None, None)):
            raise BundleError(f"{path} gives {vision.n_tokens} x {vision.hidden} embeddings, the manifest says "
                              f"{n_tokens} x {hidden}")
        return cls(vision, spec, n_tokens, hidden)

    def encode(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        from .preprocess import preprocess_batch

        if not images:
            return []
        out = self.vision.encode(preprocess_batch(list(images), self.spec))
        return [out[i] for i in range(out.shape[0])]

    def close(self) -> None:
        self.vision.close()


AUDIO_INPUT, AUDIO_OUTPUT = "input_features", "audio_embeds"


class AudioEmbeddingEncoder:
    """A bundle's audio encoder + projector in ONNX Runtime (manifest `encoders.audio`, mode
    embeddings): audio samples in, one (tokens, llm_hidden) block of rows per clip out, spliced at
    the audio placeholder like an image's rows. Each clip is one 30 s Whisper window at most.

    Graph contract: input `input_features` float32 (batch, n_mels, n_frames), Whisper's log-mel;
    output `audio_embeds` float32 (batch, tokens, llm_hidden)."""

    mode = "embeddings"

    def __init__(self, session: Any, path: Path, n_mels: int, n_tokens: int, hidden: int):
        self.session = session
        self.path = path
        self.providers: list[str] = list(session.get_providers())
        self.n_mels = n_mels
        self.n_tokens = n_tokens
        self.hidden = hidden

    @classmethod
    def load(cls, path: Path | str, n_mels: int, n_tokens: int, hidden: int,
             providers: Sequence[Provider] | None = None, threads: int | None = None) -> AudioEmbeddingEncoder:
        path = Path(path)
        session = ort_session(path, providers, threads, "audio encoder")
        inputs = {i.name: i.shape for i in session.get_inputs()}
        outputs = {o.name: o.shape for o in session.get_outputs()}
        if AUDIO_INPUT not in inputs or AUDIO_OUTPUT not in outputs:
            raise BundleError(f"{path} is not an audio encoder graph (needs input {AUDIO_INPUT!r} and output "
                              f"{AUDIO_OUTPUT!r})")
        got = tuple(outputs[AUDIO_OUTPUT][1:])
        if inputs[AUDIO_INPUT][1] != n_mels or got != (n_tokens, hidden):
            raise BundleError(f"{path} takes {inputs[AUDIO_INPUT][1]} mel bins and gives {got[0]} x {got[1]} "
                              f"embeddings; the manifest says {n_mels} bins, {n_tokens} x {hidden}")
        return cls(session, path, n_mels, n_tokens, hidden)

    @classmethod
    def from_manifest(cls, path: Path, entry: dict[str, Any], threads: int | None = None,
                      providers: Sequence[Provider] | None = None) -> AudioEmbeddingEncoder:
        """`entry` is the manifest's `encoders.audio` (export.onnx.audio's AudioExportInfo.to_dict())."""
        try:
            n_mels, n_tokens, hidden = int(entry["n_mels"]), int(entry["n_tokens"]), int(entry["hidden"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"the manifest's audio encoder entry is incomplete ({exc})") from None
        return cls.load(path, n_mels, n_tokens, hidden, providers or entry.get("providers"), threads)

    def features(self, clips: Sequence[tuple[np.ndarray, int]]) -> np.ndarray:
        from .audio import window_features

        return np.stack([window_features(samples, rate, self.n_mels) for samples, rate in clips])

    def run(self, features: np.ndarray) -> np.ndarray:
        """(n, n_mels, frames) float32 log-mel -> (n, tokens, hidden) float32."""
        out = self.session.run([AUDIO_OUTPUT], {AUDIO_INPUT: np.ascontiguousarray(features, dtype=np.float32)})[0]
        return out.astype(np.float32, copy=False)

    def encode(self, clips: Sequence[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        """(samples, sample rate) per clip -> its embedding rows."""
        if not clips:
            return []
        out = self.run(self.features(clips))
        return [out[i] for i in range(out.shape[0])]

    def close(self) -> None:
        self.session = None


class SpeechEncoder:
    """A bundle's Whisper in ONNX Runtime: audio samples in, the text heard out.

    Speech reaches the LLM as text (a cascade): the transcript is what the person is shown as
    heard, and what the model answers. Audio longer than one 30 s window is cut into windows,
    each decoded greedily with the KV cache, and the texts are joined."""

    mode = "transcribe"

    def __init__(self, whisper: Any):
        self.whisper = whisper

    @property
    def providers(self) -> list[str]:
        return self.whisper.providers

    @classmethod
    def from_bundle(cls, bundle: Any, entry: dict[str, Any], threads: int | None = None,
                    providers: Sequence[Provider] | None = None) -> SpeechEncoder:
        from .whisper import WhisperONNX

        folder = entry.get("folder")
        if not isinstance(folder, str):
            raise BundleError(f"bundle {bundle.root}: encoders.audio has no folder")
        listed = {rel for rel in bundle.manifest.files if rel.startswith(folder.rstrip("/") + "/")}
        for rel in listed:
            path = bundle.file(rel)  # listed and inside the bundle
        present = {f"{folder.rstrip('/')}/{f.name}" for f in (bundle.root / folder).iterdir()} if listed else set()
        if not listed or present - listed:
            raise BundleError(f"bundle {bundle.root}: {folder} holds files the manifest does not list "
                              f"({', '.join(sorted(present - listed)) or 'none listed'})")
        return cls(WhisperONNX.load(path.parent, providers or entry.get("providers"), threads))

    def transcribe(self, samples: np.ndarray, sample_rate: int) -> str:
        from .audio import log_mel, resample, windows

        x = resample(np.asarray(samples, dtype=np.float32), sample_rate)
        texts = [self.whisper.transcribe(log_mel(w, 16_000, self.whisper.n_mels)) for w in windows(x)]
        return " ".join(t for t in texts if t).strip()

    def close(self) -> None:
        self.whisper.close()
