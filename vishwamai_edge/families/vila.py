"""VILA1.5 (LlavaLlamaModel: llm/, vision_tower/, mm_projector/ folders): the tower and mlp_downsample
projector -> ONNX, the LLM as a plain HF folder with the VILA1.5 template; a TinyChat AWQ LLM (VILA *-AWQ)
kept as our AWQ GEMM folder for the engines and dequantized for the GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..fsutil import atomic_dir, sha256_json
from ..sources.folders import is_vila
from ..stages.context import BuildContext, BundlePart
from ..stages.source import stage_dequantize_awq
from ..stages.stamps import folder_fingerprint, mark_done, up_to_date
from ..stages.vision import stage_vision, vision_part
from .base import FamilyBuild


class VILA:
    name = "vila"

    def detect(self, folder: Path) -> bool:
        return is_vila(folder)

    def size(self, folder: Path, name: str) -> Any:
        from ..export.vila import model_size, read_vila

        return model_size(read_vila(folder), name)

    def build(self, ctx: BuildContext, folder: Path) -> FamilyBuild:
        part, llm, awq = stage_vila(ctx, folder)
        return FamilyBuild(llm, [part], awq)


FAMILY = VILA()


def stage_vila(ctx: BuildContext, root: Path) -> tuple[BundlePart, Path, Path | None]:
    """A VILA folder: vision tower + mlp_downsample projector -> ONNX (checked against our torch
    reference), and its LLM as a plain HF folder with the VILA1.5 chat template. A TinyChat AWQ
    LLM (VILA *-AWQ) becomes our AWQ GEMM folder, codes and scales unchanged, and is dequantized
    for the GGUF export. Returns the vision part, the LLM folder and the AWQ folder (or None)."""
    from ..export.tinychat import find_checkpoint, write_awq_folder
    from ..export.verify import space_after_special
    from ..export.vila import (
        IMAGE_TEXT,
        VICUNA_V1_TEMPLATE,
        check_llm,
        read_vila,
        with_template,
        write_llm_folder,
    )

    layout = read_vila(root)
    check_llm(layout)
    pt = find_checkpoint(layout.llm_dir)
    encoder, entry = stage_vision(ctx, root, nested=True)
    part = vision_part(ctx, encoder, entry, {"text": IMAGE_TEXT, "id": None}, VICUNA_V1_TEMPLATE, None,
                       prompt="text", space_after_special=space_after_special(layout.llm_dir, use_fast=False, legacy=False))
    if pt is None:
        out = ctx.root / "llm-hf"
        inputs = sha256_json(["vila-llm", __version__, folder_fingerprint(layout.llm_dir)])
        if up_to_date(ctx, out, inputs, "llm-hf") is None:
            with atomic_dir(out) as tmp:
                write_llm_folder(layout, tmp)
            mark_done(out, inputs, {})
        return part, out, None
    awq = ctx.root / "export" / "awq-int4-tinychat"
    inputs = sha256_json(["tinychat", __version__, folder_fingerprint(layout.llm_dir)])
    if up_to_date(ctx, awq, inputs, awq.name) is None:
        with ctx.console.status(f"reading {pt.name} (TinyChat AWQ) into an AWQ GEMM checkpoint, codes unchanged"):
            write_awq_folder(pt, layout.llm_dir, awq)
            with_template(layout.llm_dir, awq)
        mark_done(awq, inputs, {"pre_quantized": "tinychat", "file": pt.name})
        ctx.console.print(f"[green]✓[/] {pt.name}: INT4 codes, zero points and scales taken as they are")
    return part, stage_dequantize_awq(ctx, awq), awq
