"""An LLM that hears, made here (`finetune.method: align` with an audio encoder): the encoder and projector
-> ONNX, whose rows enter the LLM at its `<audio>` token (manifest `encoders.audio`, mode embeddings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..fsutil import sha256_json
from ..stages.context import BuildContext, BundlePart, encoder_providers
from ..stages.stamps import folder_fingerprint, mark_done, up_to_date
from ..train.aligned_folder import is_aligned, read_info
from .base import FamilyBuild, config_size


class AudioEmbeddings:
    name = "audio-embeddings"

    def detect(self, folder: Path) -> bool:
        return is_aligned(folder) and read_info(folder)["encoder"].get("modality") == "audio"

    def size(self, folder: Path, name: str) -> Any:
        return config_size(folder / "llm", name)

    def build(self, ctx: BuildContext, folder: Path) -> FamilyBuild:
        return FamilyBuild(folder / "llm", [stage_audio_embeddings(ctx, folder)])


FAMILY = AudioEmbeddings()


def stage_audio_embeddings(ctx: BuildContext, aligned: Path) -> BundlePart:
    """An aligned folder with an audio encoder: encoder + projector -> ONNX, checked against torch. The
    bundle's audio parts then enter the LLM as embedding rows (manifest `encoders.audio`, mode
    embeddings), not through a transcript."""
    from ..export.llava import chat_template
    from ..export.onnx.audio import export_audio
    from ..train.aligned_folder import read_info

    dtype = ctx.recipe.export.audio.dtype
    out = ctx.root / "export" / f"audio-{dtype}.onnx"
    inputs = sha256_json(["audio", __version__, folder_fingerprint(aligned), dtype])
    if (cached := up_to_date(ctx, out, inputs, out.name)) is None:
        with ctx.console.status(f"exporting the audio encoder to {out.name} and checking it against torch"):
            info = export_audio(aligned, out, dtype, threads=ctx.n_threads)
        cached = info.to_dict()
        mark_done(out, inputs, cached)
        c = cached["check"]
        ctx.console.print(f"[green]✓[/] {out.name}: {info.n_tokens} tokens x {info.hidden} per clip, "
                          f"max rel diff {c['max_rel_diff']:.3g}, min cosine {c['min_cosine']:.6f}")
    rel = "encoders/audio.onnx"
    return BundlePart([(out, rel)], {
        "encoders": {"audio": {**cached, "file": rel, "providers": encoder_providers(ctx.target)}},
        "llm": {"audio_token": read_info(aligned)["audio_token"],
                **({"chat_template": t} if (t := chat_template(aligned / "llm")) else {})},
        "checks": {"audio": cached["check"]},
    }, ["onnxruntime"])
