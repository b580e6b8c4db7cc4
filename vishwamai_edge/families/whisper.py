"""Speech input by transcript (the recipe's `speech` section, whatever the LLM): Whisper -> ONNX encoder and
KV-cache decoders checked against torch; the device transcribes, then the LLM reads the text."""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..errors import SourceError
from ..fsutil import sha256_json
from ..recipe import Recipe
from ..stages.context import BuildContext, BundlePart, encoder_providers, folder_part
from ..stages.stamps import folder_fingerprint, mark_done, up_to_date


class WhisperCascade:
    name = "whisper"

    def wanted(self, recipe: Recipe) -> bool:
        return recipe.speech is not None

    def build(self, ctx: BuildContext) -> BundlePart:
        return stage_speech(ctx)


SECTION = WhisperCascade()


def stage_speech(ctx: BuildContext) -> BundlePart:
    """Whisper -> ONNX encoder and decoders (KV cache), checked against torch: the bundle's audio encoder."""
    from ..export.onnx.whisper import export_whisper

    spec = ctx.recipe.speech
    assert spec is not None
    hf_dir = _speech_source(ctx)
    out = ctx.root / "export" / f"whisper-{spec.dtype}"
    inputs = sha256_json(["whisper", __version__, folder_fingerprint(hf_dir), spec.dtype])
    if (cached := up_to_date(ctx, out, inputs, out.name)) is None:
        with ctx.console.status(f"exporting Whisper to ONNX ({spec.dtype}) and checking it against torch"):
            info = export_whisper(hf_dir, out, spec.dtype, threads=ctx.n_threads)
        cached = info.to_dict()
        mark_done(out, inputs, cached)
        ctx.console.print(f"[green]✓[/] {out.name}: encoder and decoders checked against torch")
    rel_dir = "encoders/whisper"
    entry = {**cached, "kind": "speech-to-text", "folder": rel_dir,
             "files": {k: f"{rel_dir}/{v}" for k, v in cached["files"].items()},
             "providers": encoder_providers(ctx.target)}
    return BundlePart(folder_part(out, rel_dir), {"encoders": {"audio": entry}, "checks": {"speech": cached["check"]}},
                      ["onnxruntime"])


def _speech_source(ctx: BuildContext) -> Path:
    """The recipe's Whisper as an HF folder: a CTranslate2 checkpoint (the embedded tiny.en) is converted once."""
    from ..sources.embedded import embedded_whisper_ct2
    from ..sources.folders import check_hf_dir
    from ..sources.whisper_ct2 import whisper_hf_from_ctranslate2

    spec = ctx.recipe.speech
    assert spec is not None
    if spec.kind == "hf":
        if spec.path is None:
            raise SourceError(f"{ctx.recipe.path}: speech.path: required for speech kind 'hf'")
        return check_hf_dir(ctx.recipe.resolve(spec.path))
    ct2 = embedded_whisper_ct2() if spec.kind == "embedded" else None
    if ct2 is None:
        if spec.path is None:
            raise SourceError(f"{ctx.recipe.path}: speech.path: required for speech kind 'ctranslate2'")
        ct2 = ctx.recipe.resolve(spec.path)
    out = ctx.root / "whisper-hf"
    inputs = sha256_json(["whisper-hf", __version__, folder_fingerprint(ct2)])
    if up_to_date(ctx, out, inputs, "whisper-hf") is None:
        with ctx.console.status(f"converting {ct2.name} (CTranslate2) into an HF Whisper folder"):
            whisper_hf_from_ctranslate2(ct2, out)
        mark_done(out, inputs, {})
    return out
