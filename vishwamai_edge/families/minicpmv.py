"""MiniCPM-V 2.0 and 2.6: tower + resampler -> one fp32 ONNX graph for any slice size with the position
table beside it, an mmproj GGUF for stock llama.cpp (2.6), the `llm.*` tensors as a plain HF folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ExportError
from ..export.minicpmv import is_minicpmv
from ..fsutil import atomic_dir, atomic_file, sha256_json
from ..stages.context import BuildContext, BundlePart, encoder_providers
from ..stages.stamps import folder_fingerprint, mark_done, up_to_date
from .base import FamilyBuild


class MiniCPMV:
    name = "minicpmv"

    def detect(self, folder: Path) -> bool:
        return is_minicpmv(folder)

    def size(self, folder: Path, name: str) -> Any:
        from ..export.minicpmv import model_size, read_minicpmv

        return model_size(read_minicpmv(folder), name)

    def build(self, ctx: BuildContext, folder: Path) -> FamilyBuild:
        part, llm = stage_minicpmv(ctx, folder)
        return FamilyBuild(llm, [part])


FAMILY = MiniCPMV()


def stage_minicpmv(ctx: BuildContext, root: Path) -> tuple[BundlePart, Path]:
    """A MiniCPM-V folder (2.0 or 2.6): tower + resampler -> one fp32 ONNX graph that takes any slice
    size (checked against our torch reference) with the tower's position table beside it, the slicing
    settings and marker texts in the manifest; its `llm.*` tensors as a plain HF folder (MiniCPM or
    Qwen2) for the GGUF export. Returns the vision part and the LLM folder."""
    from ..export.minicpmv import (
        chat_template,
        export_vision,
        manifest_entry,
        read_minicpmv,
        write_llm_folder,
    )
    from ..export.verify import space_after_special
    from ..runtime.minicpmv import IMAGE_MARKER

    layout = read_minicpmv(root)
    spec = ctx.recipe.export.vision
    if spec.dtype != "fp32":
        raise ExportError(f"{ctx.recipe.path}: export.vision.dtype {spec.dtype!r}: MiniCPM-V's vision graph is "
                          "exported in fp32 only (its slices come in any size, and the check is against fp32 torch)")
    llm = ctx.root / "llm-hf"
    inputs = sha256_json(["minicpmv-llm", __version__, folder_fingerprint(root)])
    if up_to_date(ctx, llm, inputs, "llm-hf") is None:
        with ctx.console.status(f"splitting out MiniCPM-V {layout.version}'s language model"), atomic_dir(llm) as tmp:
            write_llm_folder(layout, tmp)
        mark_done(llm, inputs, {})
    graph = ctx.root / "export" / "vision-minicpmv-fp32.onnx"
    positions = graph.with_name("minicpmv-positions.npy")
    inputs = sha256_json(["minicpmv-vision", __version__, folder_fingerprint(root), spec.model_dump()])
    if (cached := up_to_date(ctx, graph, inputs, graph.name)) is None or not positions.is_file():
        with ctx.console.status(f"exporting MiniCPM-V {layout.version}'s tower + resampler to {graph.name} and "
                                "checking it against torch"), atomic_file(graph) as tmp, atomic_file(positions) as ptmp:
            cached = export_vision(layout, tmp, ptmp, ctx.n_threads)
        mark_done(graph, inputs, cached)
        ctx.console.print(f"[green]✓[/] {graph.name}: {cached['n_tokens']} rows x {cached['hidden']} per slice, "
                          f"max |diff| {cached['check']['max_abs_diff']:.3g}")
    rels = f"encoders/{graph.name}", f"encoders/{positions.name}"
    entry = manifest_entry(layout, cached, rels[0], rels[1], encoder_providers(ctx.target))
    part = BundlePart([(graph, rels[0]), (positions, rels[1])], {
        "encoders": {"image": entry},
        "llm": {"image_token": {"text": IMAGE_MARKER, "id": None}, "prompt": "sliced",
                "chat_template": chat_template(layout.version),
                # 2.0's own tokenizer (LlamaTokenizerWrapper) is the slow LlamaTokenizer
                **({} if space_after_special(llm, use_fast=False) else {"space_after_special": False})},
        "checks": {"vision": entry["check"]},
    }, ["onnxruntime"])
    mmproj = stage_minicpmv_mmproj(ctx, layout)
    if mmproj is not None:
        part.files.append((mmproj, f"llm/{mmproj.name}"))
        part.manifest["mmproj"] = {"file": f"llm/{mmproj.name}", "note": "for stock llama.cpp (llama-mtmd-cli)"}
    return part, llm


def stage_minicpmv_mmproj(ctx: BuildContext, layout: Any) -> Path | None:
    """2.6 with export.vision.mmproj: the vision side as an mmproj GGUF for stock llama.cpp's mtmd."""
    from ..export.gguf.minicpmv_mmproj import NAVIT_SIDE, write_minicpmv_mmproj
    from ..export.minicpmv_vision import read_vision_layout
    from ..export.torch_state import safetensors_state

    if not ctx.recipe.export.vision.mmproj:
        return None
    if layout.version != "2.6":
        ctx.console.print(f"[yellow]-[/] no mmproj: llama.cpp's mtmd does not carry MiniCPM-V {layout.version}")
        return None
    side = read_vision_layout(safetensors_state(layout.root, "MiniCPM-V"), layout.config, layout.root).pos_side
    if side != NAVIT_SIDE:
        ctx.console.print(f"[yellow]-[/] no mmproj: llama.cpp's MiniCPM-V graph needs a {NAVIT_SIDE} x {NAVIT_SIDE} "
                          f"position table, this tower has {side} x {side}")
        return None
    outtype = "f32" if ctx.recipe.export.gguf.outtype == "f32" else "f16"
    out = ctx.root / "export" / f"mmproj-{outtype}.gguf"
    inputs = sha256_json(["minicpmv-mmproj", __version__, folder_fingerprint(layout.root), outtype])
    if up_to_date(ctx, out, inputs, out.name) is None:
        with ctx.console.status(f"writing {out.name}"), atomic_file(out) as tmp:
            write_minicpmv_mmproj(layout, tmp, outtype)
        mark_done(out, inputs, {})
    return out
