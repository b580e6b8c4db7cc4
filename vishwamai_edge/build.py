"""`build`: recipe + target -> device bundle, as resumable stages (vishwamai_edge/stages).

Each stage writes one artifact atomically and a stamp beside it holding the hash of its inputs and its
result (check numbers). A rerun skips every stage whose stamp matches, so an interrupted build resumes
where it stopped and a finished one costs seconds. The model family (vishwamai_edge/families) builds
what its layout needs beside the LLM; this module composes and names no family.

    build/<recipe>/source/                 HF folder (only for GGUF sources)
    build/<recipe>/pruned/                 the smaller student (a prune section)
    build/<recipe>/finetune/               adapter/ (or model/ with finetune.full), checkpoints while it trains
    build/<recipe>/llm-hf/                 a vision-language model's language model, split out
    build/<recipe>/export/model-f16.gguf   converted + checked against torch
    build/<recipe>/export/model-q4_k_m.gguf
    build/<recipe>/export/vision-fp16.onnx vision tower + projector (VLMs), checked against torch
    build/<recipe>/export/audio-fp32.onnx  an aligned audio encoder + projector, checked against torch
    build/<recipe>/export/mmproj-f16.gguf  the same for stock llama.cpp (CLIP towers)
    build/<recipe>/<target>/               the bundle: llm/..., encoders/..., manifest.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from .errors import ExportError
from .families import SECTIONS, family_for
from .fsutil import clean_stale_temps
from .recipe import Recipe
from .stages.context import BuildContext, BundlePart
from .stages.engines import stage_engines, wants_engines
from .stages.eval_check import stage_eval_check
from .stages.export_llm import stage_export_gguf, stage_memory_plan, stage_quantize
from .stages.finetune import stage_training
from .stages.package import stage_package
from .stages.prune import prune_record, stage_prune, stage_teacher
from .stages.source import stage_dequantize_awq, stage_source
from .targets import TargetProfile


@dataclass
class BuildResult:
    bundle: Path
    manifest: dict[str, Any]
    skipped: list[str]


def build(
    recipe: Recipe,
    target: TargetProfile,
    out_root: Path = Path("build"),
    quant: str | None = None,
    n_threads: int | None = None,
    console: Console | None = None,
) -> BuildResult:
    from .export.quantize import QUANT_FTYPES

    console = console or Console(stderr=True)
    quant = quant or target.gguf_quant
    known = (*QUANT_FTYPES, recipe.export.gguf.outtype)
    if quant not in known:  # before minutes of dequantizing and converting, not after
        raise ExportError(f"unknown quantization {quant!r}; choose one of {', '.join(known)}")
    root = Path(out_root) / recipe.name
    for sub in (root, root / "export", root / "finetune"):
        clean_stale_temps(sub)
    ctx = BuildContext(recipe, target, root, console, n_threads)

    hf_dir = stage_source(ctx)
    if recipe.source.use_as_is:  # a pre-quantized GGUF, bundled byte for byte and checked without torch
        return _bundle_as_is(ctx, hf_dir)
    from .export.awq import is_awq_checkpoint

    awq_source = None
    if is_awq_checkpoint(hf_dir):  # a published *-AWQ model
        awq_source, hf_dir = hf_dir, stage_dequantize_awq(ctx, hf_dir)
    checks: dict[str, Any] = {}
    teacher = stage_teacher(ctx, hf_dir)  # a wrong teacher fails before minutes of pruning
    if recipe.prune is not None:  # the student: the memory plan and everything after are its
        hf_dir = stage_prune(ctx, hf_dir)
        checks["prune"] = {"check": prune_record(hf_dir)}
    ctx.size = family_for(hf_dir).size(hf_dir, recipe.name)
    plan = stage_memory_plan(ctx, quant)
    if recipe.finetune is not None:
        hf_dir, trained = stage_training(ctx, hf_dir, teacher)
        checks.update(trained)
    family = family_for(hf_dir).build(ctx, hf_dir)  # align made a folder of another family
    hf_dir, parts = family.llm_dir, list(family.parts)
    awq_source = awq_source or family.awq_source
    parts += [section.build(ctx) for section in SECTIONS if section.wanted(recipe)]
    if wants_engines(ctx, hf_dir):
        parts.append(stage_engines(ctx, hf_dir, awq_source, _image_rows(parts)))
    base, checks[recipe.export.gguf.outtype] = stage_export_gguf(ctx, hf_dir)
    for q in dict.fromkeys([*recipe.export.gguf.quants, quant]):
        if q != recipe.export.gguf.outtype:
            _, checks[q] = stage_quantize(ctx, hf_dir, base, q)
    bundle_gguf = base if quant == recipe.export.gguf.outtype else base.with_name(f"model-{quant}.gguf")
    if (scored := stage_eval_check(ctx, base, bundle_gguf)) is not None:
        checks["eval"] = {"check": scored}
    out_dir = root / (target.name if quant == target.gguf_quant else f"{target.name}-{quant}")
    manifest = stage_package(ctx, bundle_gguf, quant, checks, out_dir, parts, plan)
    if recipe.source.kind == "hub":  # the commit the weights came from
        from .sources.as_is import finish_manifest

        manifest = finish_manifest(out_dir, root, recipe.source)
    console.print(f"[bold green]bundle ready:[/] {out_dir}")
    return BuildResult(out_dir, manifest, ctx.skipped)


def _bundle_as_is(ctx: BuildContext, gguf: Path) -> BuildResult:
    from .sources.as_is import check_as_is, finish_manifest

    with ctx.console.status(f"checking {gguf.name} with llama.cpp (bundled as is)"):
        gguf_quant, entry = check_as_is(gguf, ctx.recipe.export.verify.prompts, ctx.root, ctx.n_threads)
    out_dir = ctx.root / f"{ctx.target.name}-{gguf_quant}"
    stage_package(ctx, gguf, gguf_quant, {gguf_quant: entry}, out_dir)
    ctx.console.print(f"[bold green]bundle ready:[/] {out_dir}")
    return BuildResult(out_dir, finish_manifest(out_dir, ctx.root, ctx.recipe.source), ctx.skipped)


def _image_rows(parts: list[BundlePart]) -> int | None:
    """The image encoder's rows per image, which size the engine's prompt table (None: no images)."""
    image = next((p.manifest["encoders"]["image"] for p in parts if "image" in p.manifest.get("encoders", {})), None)
    return image["n_tokens"] if image else None
