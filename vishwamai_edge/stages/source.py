"""The source stages: the recipe's model as an HF folder (or a GGUF bundled as is), a pre-quantized
AWQ checkpoint dequantized for the GGUF path."""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..errors import SourceError
from ..fsutil import atomic_dir, check_gguf_file, sha256_json
from ..recipe import SourceSpec
from .context import BuildContext
from .stamps import folder_fingerprint, mark_done, up_to_date


def stage_source(ctx: BuildContext, spec: SourceSpec | None = None, role: str = "source") -> Path:
    """Resolve the recipe's source (or another, e.g. a distillation's teacher, with its own `role` folder) to an
    HF folder (with source.use_as_is: to the GGUF file itself)."""
    from ..sources.embedded import embedded_hf_dir
    from ..sources.folders import check_hf_dir
    from ..sources.gguf import hf_dir_from_gguf
    from ..sources.hub import hub_source

    spec = spec or ctx.recipe.source
    where = "source" if role == "source" else "finetune.distill.teacher"
    if spec.kind == "embedded":
        with ctx.console.status("materialising the embedded model (once)"):
            return embedded_hf_dir()
    if spec.kind == "hub":  # huggingface_hub shows its own progress bars
        return hub_source(spec, ctx.root if role == "source" else ctx.root / role)
    if spec.path is None:
        raise SourceError(f"{ctx.recipe.path}: {where}.path: required for source kind {spec.kind!r}")
    path = ctx.recipe.resolve(spec.path)
    if spec.kind == "hf":
        try:
            return check_hf_dir(path)
        except SourceError as exc:
            if role == "source":
                raise
            raise SourceError(f"{ctx.recipe.path}: {where}: {exc}") from None
    if spec.use_as_is:
        return check_gguf_file(path)
    with ctx.console.status(f"dequantizing {path.name} into an HF folder"):
        return hf_dir_from_gguf(path, ctx.root / role)



def stage_dequantize_awq(ctx: BuildContext, awq_dir: Path) -> Path:
    """A pre-quantized AWQ source -> fp16 HF folder for the GGUF path (its INT4 values dequantized exactly)."""
    from ..export.awq import dequantize_awq_folder

    out = ctx.root / "awq-dequantized"
    inputs = sha256_json(["awq-dequantized", __version__, folder_fingerprint(awq_dir)])
    if up_to_date(ctx, out, inputs, out.name) is None:
        with ctx.console.status("dequantizing the AWQ checkpoint for the GGUF export"), atomic_dir(out) as tmp:
            dequantize_awq_folder(awq_dir, tmp)
        mark_done(out, inputs, {})
    return out
