"""LLaVA (llava-hf layout: LlavaForConditionalGeneration): the CLIP or SigLIP tower and projector -> ONNX, an
mmproj GGUF for stock llama.cpp (CLIP towers), the language model split out as a plain HF folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..export.llava import is_llava
from ..fsutil import atomic_dir, sha256_json
from ..stages.context import BuildContext
from ..stages.stamps import folder_fingerprint, mark_done, up_to_date
from ..stages.vision import stage_vision, vision_part
from .base import FamilyBuild, config_size


class LLaVA:
    name = "llava"

    def detect(self, folder: Path) -> bool:
        return is_llava(folder)

    def size(self, folder: Path, name: str) -> Any:
        return config_size(folder, name)  # text and vision config in one config.json

    def build(self, ctx: BuildContext, folder: Path) -> FamilyBuild:
        from ..export.llava import chat_template, image_token

        from ..export.verify import space_after_special

        encoder, entry = stage_vision(ctx, folder)
        part = vision_part(ctx, encoder, entry, image_token(folder).to_dict(), chat_template(folder),
                           stage_mmproj(ctx, folder), space_after_special=space_after_special(folder))
        return FamilyBuild(stage_split_llm(ctx, folder), [part])


FAMILY = LLaVA()


def stage_split_llm(ctx: BuildContext, hf_dir: Path) -> Path:
    """A LLaVA folder's language model as a plain HF folder, for the GGUF export and its check."""
    from ..export.llava import split_language_model

    out = ctx.root / "llm-hf"
    inputs = sha256_json(["split", __version__, folder_fingerprint(hf_dir)])
    if up_to_date(ctx, out, inputs, "llm-hf") is not None:
        return out
    with ctx.console.status("splitting out the language model"), atomic_dir(out) as tmp:
        split_language_model(hf_dir, tmp)
    mark_done(out, inputs, {})
    return out


def stage_mmproj(ctx: BuildContext, hf_dir: Path) -> Path | None:
    """The vision side as an mmproj GGUF, so the bundle also runs in stock llama.cpp (CLIP towers only)."""
    from ..export.gguf.mmproj import write_mmproj
    from ..export.llava import read_config

    if not ctx.recipe.export.vision.mmproj:
        return None
    if (read_config(hf_dir).get("vision_config") or {}).get("model_type") != "clip_vision_model":
        ctx.console.print("[yellow]-[/] no mmproj: llama.cpp's LLaVA projector takes CLIP towers only")
        return None
    outtype = "f32" if ctx.recipe.export.gguf.outtype == "f32" else "f16"
    out = ctx.root / "export" / f"mmproj-{outtype}.gguf"
    inputs = sha256_json(["mmproj", __version__, folder_fingerprint(hf_dir), outtype])
    if up_to_date(ctx, out, inputs, out.name) is not None:
        return out
    with ctx.console.status(f"writing {out.name}"):
        write_mmproj(hf_dir, out, outtype)
    mark_done(out, inputs, {})
    return out
