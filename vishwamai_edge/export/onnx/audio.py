"""Audio encoder + projector (an aligned folder of `align` with a Whisper encoder) -> one ONNX graph.

Graph contract (what `runtime.encoders.AudioEmbeddingEncoder` relies on):
  input  `input_features` float32 (batch, n_mels, n_frames): Whisper's log-mel of one 30 s window
  output `audio_embeds`  float32 (batch, tokens, llm_hidden): rows spliced at the audio placeholder
I/O stays float32 for every dtype; fp16 and int8 are inside the graph. The check runs ONNX Runtime
against the torch encoder + projector on the log-mel of a tone sweep, noise, speech-like bursts and
silence, computed with the device's own numpy front end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ExportError, require
from ...runtime.encoders import AUDIO_INPUT, AUDIO_OUTPUT, AudioEmbeddingEncoder
from .base import DTYPES, OPSET, TOLERANCE, output_diffs, torch_export, within, write_dtype


@dataclass
class AudioExportInfo:
    path: Path
    family: str
    dtype: str
    opset: int
    n_mels: int
    n_frames: int
    n_tokens: int
    hidden: int  # the language model's width: audio_embeds' last axis
    audio_hidden: int
    stack: int
    check: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path.name, "kind": "audio-embeddings", "mode": "embeddings", "family": self.family,
                "dtype": self.dtype, "io_dtype": "float32", "opset": self.opset, "input": AUDIO_INPUT,
                "output": AUDIO_OUTPUT, "n_mels": self.n_mels, "n_frames": self.n_frames,
                "n_tokens": self.n_tokens, "hidden": self.hidden, "audio_hidden": self.audio_hidden,
                "stack": self.stack, "check": self.check}


def check_clips(seconds: float = 4.0, rate: int = 16_000) -> list[tuple[np.ndarray, int]]:
    """Sounds unlike each other: a tone sweep, noise, bursts of harmonics (speech-like), silence."""
    t = np.arange(int(seconds * rate)) / rate
    sweep = 0.5 * np.sin(2 * np.pi * (100 + 900 * t) * t)
    noise = 0.1 * np.random.default_rng(0).standard_normal(t.size)
    bursts = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 6)) * (np.sin(2 * np.pi * 3 * t) > 0) * 0.3
    return [(x.astype(np.float32), rate) for x in (sweep, noise, bursts, np.zeros(rate // 2))]


def export_audio(folder: Path | str, out_path: Path | str, dtype: str = "fp32", *, opset: int = OPSET,
                 tolerance: dict[str, float] | None = None, threads: int | None = None) -> AudioExportInfo:
    """Export the aligned folder's audio encoder + projector to `out_path` and check it against torch.
    Raises ExportError when ONNX Runtime's output is outside `tolerance` (default TOLERANCE[dtype]);
    nothing is left at `out_path` then."""
    torch = require("torch", "build")
    from ...fsutil import atomic_file
    from ...train.aligned_folder import is_aligned, load_aligned

    if dtype not in DTYPES:
        raise ExportError(f"unknown audio export dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not is_aligned(Path(folder)):
        raise ExportError(f"{folder} is not an aligned folder (no vlm.json)")
    aligned = load_aligned(Path(folder))
    if aligned.modality != "audio":
        raise ExportError(f"{folder}: its encoder ({aligned.encoder.name}) reads images, not audio")
    enc, projector = aligned.encoder, aligned.projector
    n_mels, n_frames = int(enc.settings["n_mels"]), int(enc.settings["n_frames"])
    graph = aligned.vision_graph()
    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        example = torch.zeros(2, n_mels, n_frames)
        write_dtype(lambda fp32: torch_export(graph, fp32, example, AUDIO_INPUT, AUDIO_OUTPUT, opset), tmp, dtype,
                    enc.int8_op_types)
        runtime = AudioEmbeddingEncoder.load(tmp, n_mels, projector.tokens, projector.out_dim,
                                             providers=["CPUExecutionProvider"], threads=threads)
        try:
            features = runtime.features(check_clips())
            got, single = runtime.run(features), runtime.run(features[:1])
        finally:
            runtime.close()
        with torch.no_grad():
            want = graph(torch.from_numpy(features)).float().numpy()
        check = {"clips": int(features.shape[0]), **output_diffs(got, single, want)}
        within(check, tolerance or {**TOLERANCE, **enc.tolerance}[dtype], "audio encoder", dtype)
    return AudioExportInfo(out_path, f"aligned-{enc.name}", dtype, opset, n_mels, n_frames, projector.tokens,
                           projector.out_dim, enc.dim, projector.stack, check)
