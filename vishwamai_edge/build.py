"""`build`: recipe + target -> device bundle, as resumable stages.

Each stage writes one artifact atomically and a stamp beside it holding the hash
of its inputs and its result (check numbers). A rerun skips every stage whose
stamp matches, so an interrupted build resumes where it stopped and a finished
one costs seconds.

    build/<recipe>/source/                 HF folder (only for GGUF sources)
    build/<recipe>/llm-hf/                 a vision-language model's language model, split out
    build/<recipe>/export/model-f16.gguf   converted + checked against torch
    build/<recipe>/export/model-q4_k_m.gguf
    build/<recipe>/export/vision-fp16.onnx vision tower + projector (VLMs), checked against torch
    build/<recipe>/export/audio-fp32.onnx  an aligned audio encoder + projector, checked against torch
    build/<recipe>/export/mmproj-f16.gguf  the same for stock llama.cpp (CLIP towers)
    build/<recipe>/<target>/               the bundle: llm/..., encoders/..., manifest.json
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console

from . import __version__
from .errors import ExportError, SourceError
from .export.llava import is_llava
from .export.minicpmv import is_minicpmv
from .fsutil import (atomic_dir, atomic_file, check_gguf_file, clean_stale_temps, sha256_json, weights_digest,
                     write_json)
from .recipe import Recipe
from .runtime.bundle import write_manifest
from .sources import is_vila
from .targets import TargetProfile
from .vlm.folder import is_aligned

STAMP_SUFFIX = ".stamp.json"

@dataclass
class BuildContext:
    recipe: Recipe
    target: TargetProfile
    root: Path  # build/<recipe>
    console: Console
    n_threads: int | None = None
    _reference: Any = None
    skipped: list[str] = field(default_factory=list)
    size: Any = None  # memory_plan.ModelSize of the source, set by stage_memory_plan

    def reference(self, hf_dir: Path):
        """The torch model, loaded only when a check actually has to run."""
        if self._reference is None:
            from .export.verify import TorchReference

            with self.console.status("loading the torch reference model"):
                self._reference = TorchReference(hf_dir)
        return self._reference

@dataclass
class BuildResult:
    bundle: Path
    manifest: dict[str, Any]
    skipped: list[str]

# -- stamps --------------------------------------------------------------------------------
def _stamp_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + STAMP_SUFFIX)

def cached_result(artifact: Path, inputs: str) -> dict[str, Any] | None:
    stamp = _stamp_path(artifact)
    if not (artifact.exists() and stamp.is_file()):
        return None
    try:
        data = json.loads(stamp.read_text())
    except json.JSONDecodeError:
        return None
    if data.get("inputs") != inputs:
        return None
    if artifact.is_file() and artifact.stat().st_size != data.get("size"):
        return None
    return data.get("result", {})

def up_to_date(ctx: BuildContext, artifact: Path, inputs: str, name: str) -> dict[str, Any] | None:
    """The stage's recorded result if its stamp matches (the stage is then skipped), else None."""
    cached = cached_result(artifact, inputs)
    if cached is not None:
        ctx.skipped.append(name)
        ctx.console.print(f"[green]✓[/] {name} (up to date)")
    return cached


def mark_done(artifact: Path, inputs: str, result: dict[str, Any]) -> None:
    size = artifact.stat().st_size if artifact.is_file() else None
    write_json(_stamp_path(artifact), {"inputs": inputs, "size": size, "result": result})

def folder_fingerprint(folder: Path, recursive: bool = False) -> list[tuple[str, int, int]]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()
    )

# -- stages --------------------------------------------------------------------------------
def stage_source(ctx: BuildContext) -> Path:
    """Resolve the recipe's source to an HF folder (with source.use_as_is: to the GGUF file itself)."""
    from . import sources

    spec = ctx.recipe.source
    if spec.kind == "embedded":
        with ctx.console.status("materialising the embedded model (once)"):
            return sources.embedded_hf_dir()
    if spec.kind == "hub":  # huggingface_hub shows its own progress bars
        return sources.hub_source(spec, ctx.root)
    if spec.path is None:
        raise SourceError(f"{ctx.recipe.path}: source.path: required for source kind {spec.kind!r}")
    path = ctx.recipe.resolve(spec.path)
    if spec.kind == "hf":
        return sources.check_hf_dir(path)
    if spec.use_as_is:
        return check_gguf_file(path)
    with ctx.console.status(f"dequantizing {path.name} into an HF folder"):
        return sources.hf_dir_from_gguf(path, ctx.root / "source")

def stage_finetune(ctx: BuildContext, hf_dir: Path, resume: bool | None = None) -> Path:
    """LoRA / QLoRA / CPT on the recipe's dataset -> finetune/adapter/; continues from its checkpoints.

    resume=None (build): continue a checkpoint of the same settings, else start over.
    """
    from .train.finetune import ADAPTER, finetune, run_fingerprint

    folder = ctx.root / "finetune"
    out = folder / ADAPTER
    inputs = run_fingerprint(ctx.recipe, [__version__, folder_fingerprint(hf_dir)])
    if up_to_date(ctx, out, inputs, "finetune") is not None:
        return out
    result = finetune(ctx.recipe, hf_dir, folder, inputs, resume=resume, console=ctx.console)
    if _main_process():
        mark_done(out, inputs, {k: v for k, v in result.to_dict().items() if k != "history"})
    return out


def stage_align(ctx: BuildContext, hf_dir: Path, resume: bool | None = None) -> Path:
    """`method: align`: frozen encoder + trained projector (+ LoRA) -> finetune/aligned/ (vlm/folder.py)."""
    from .train.align import ALIGNED, align
    from .train.finetune import run_fingerprint

    folder = ctx.root / "finetune"
    out = folder / ALIGNED
    inputs = run_fingerprint(ctx.recipe, [__version__, "align", folder_fingerprint(hf_dir)], folder)
    if up_to_date(ctx, out, inputs, "aligned") is not None:
        return out
    result = align(ctx.recipe, hf_dir, folder, inputs, resume=resume, console=ctx.console)
    mark_done(out, inputs, {k: v for k, v in result.to_dict().items() if k != "history"})
    return out


def stage_merge(ctx: BuildContext, hf_dir: Path, adapter_dir: Path) -> Path:
    """base + adapter -> merged/ (plain HF folder), checked against base + adapter unmerged."""
    from .train.merge import merge_adapter

    spec = ctx.recipe.finetune
    assert spec is not None
    out = ctx.root / "merged"
    inputs = sha256_json(["merge", __version__, _stamp_path(adapter_dir).read_text(), folder_fingerprint(hf_dir),
                          spec.merge.model_dump()])
    if up_to_date(ctx, out, inputs, "merged") is not None:
        return out
    check = merge_adapter(adapter_dir, out, hf_dir, spec.merge.prompts, spec.merge.tolerance, ctx.console)
    mark_done(out, inputs, {"check": check.to_dict()})
    return out


def finetune_and_merge(
    recipe: Recipe, out_root: Path = Path("build"), resume: bool | None = None, merge: bool = True,
    console: Console | None = None,
) -> Path:
    """`vishwamai-edge finetune`: the source, finetune (and merge) stages of `build`, same folders and stamps."""
    from .targets import get_target

    console = console or Console(stderr=True)
    root = Path(out_root) / recipe.name
    for sub in (root, root / "finetune"):
        clean_stale_temps(sub)
    ctx = BuildContext(recipe, get_target("laptop-cpu"), root, console)  # the target plays no part here
    hf_dir = stage_source(ctx)
    if recipe.finetune is not None and recipe.finetune.method == "align":
        return stage_align(ctx, hf_dir, resume=resume)
    adapter = stage_finetune(ctx, hf_dir, resume=resume)
    # under `accelerate launch` every process trains; only the first merges
    return stage_merge(ctx, hf_dir, adapter) if merge and _main_process() else adapter


def _main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # set by accelerate / torchrun for each process


def stage_memory_plan(ctx: BuildContext, hf_dir: Path, quant: str) -> dict[str, Any]:
    """Weights + KV cache + encoders + runtime against the target's memory, before any work:
    a bundle that cannot run there stops the build with the numbers and what would fit."""
    from .memory_plan import check_fits, plan_memory

    size = ctx.size = source_size(hf_dir, ctx.recipe.name)
    plan = plan_memory(size, ctx.target, quant, ctx.recipe.runtime.n_ctx, "llamacpp", ctx.recipe.export.vision.dtype,
                       kv_type=ctx.recipe.runtime.kv_type)
    check_fits(plan)  # one line with the numbers and what would fit
    if ctx.target.jetson:
        ctx.console.print(f"memory plan: {plan.line()}", soft_wrap=True, highlight=False)
    return plan.to_dict()


def source_size(hf_dir: Path, name: str) -> Any:
    """memory_plan.ModelSize of the source: a plain LM, a LLaVA folder (text + vision config) or a VILA folder."""
    from .export.llava import read_config
    from .memory_plan import model_size

    if is_vila(hf_dir):
        from .export.vila import model_size as vila_size, read_vila

        return vila_size(read_vila(hf_dir), name)
    if is_minicpmv(hf_dir):
        from .export.minicpmv import model_size as minicpmv_size, read_minicpmv

        return minicpmv_size(read_minicpmv(hf_dir), name)
    return model_size(read_config(hf_dir), name)


def stage_split_llm(ctx: BuildContext, hf_dir: Path) -> Path:
    """A LLaVA folder's language model as a plain HF folder, for the GGUF export and its check."""
    from .export.llava import split_language_model

    out = ctx.root / "llm-hf"
    inputs = sha256_json(["split", __version__, folder_fingerprint(hf_dir)])
    if up_to_date(ctx, out, inputs, "llm-hf") is not None:
        return out
    with ctx.console.status("splitting out the language model"), atomic_dir(out) as tmp:
        split_language_model(hf_dir, tmp)
    mark_done(out, inputs, {})
    return out


def stage_vision(ctx: BuildContext, hf_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Vision tower + projector -> ONNX at the recipe's dtype, checked against torch."""
    from .export.onnx import export_vision

    spec = ctx.recipe.export.vision
    out = ctx.root / "export" / f"vision-{spec.dtype}.onnx"
    inputs = sha256_json(["vision", __version__, folder_fingerprint(hf_dir, recursive=is_vila(hf_dir)),
                          spec.model_dump()])
    if (cached := up_to_date(ctx, out, inputs, out.name)) is not None:
        return out, cached
    with ctx.console.status(f"exporting the vision encoder to {out.name} and checking it against torch"):
        info = export_vision(hf_dir, out, spec.dtype, pad_to_square=spec.pad_to_square, threads=ctx.n_threads)
    result = info.to_dict()
    result["file"] = out.name
    mark_done(out, inputs, result)
    c = result["check"]
    ctx.console.print(f"[green]✓[/] {out.name}: {info.n_tokens} tokens x {info.hidden} per image, "
                      f"max rel diff {c['max_rel_diff']:.3g}, min cosine {c['min_cosine']:.6f}")
    return out, result


def stage_vila(ctx: BuildContext, root: Path) -> tuple[BundlePart, Path, Path | None]:
    """A VILA folder: vision tower + mlp_downsample projector -> ONNX (checked against our torch
    reference), and its LLM as a plain HF folder with the VILA1.5 chat template. A TinyChat AWQ
    LLM (VILA *-AWQ) becomes our AWQ GEMM folder, codes and scales unchanged, and is dequantized
    for the GGUF export. Returns the vision part, the LLM folder and the AWQ folder (or None)."""
    from .export.tinychat import find_checkpoint, write_awq_folder
    from .export.vila import IMAGE_TEXT, VICUNA_V1_TEMPLATE, check_llm, read_vila, with_template, write_llm_folder

    layout = read_vila(root)
    check_llm(layout)
    pt = find_checkpoint(layout.llm_dir)
    encoder, entry = stage_vision(ctx, root)
    part = vision_part(ctx, encoder, entry, {"text": IMAGE_TEXT, "id": None}, VICUNA_V1_TEMPLATE, None)
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


def stage_minicpmv(ctx: BuildContext, root: Path) -> tuple[BundlePart, Path]:
    """A MiniCPM-V folder (2.0 or 2.6): tower + resampler -> one fp32 ONNX graph that takes any slice
    size (checked against our torch reference) with the tower's position table beside it, the slicing
    settings and marker texts in the manifest; its `llm.*` tensors as a plain HF folder (MiniCPM or
    Qwen2) for the GGUF export. Returns the vision part and the LLM folder."""
    from .export.minicpmv import chat_template, export_vision, manifest_entry, read_minicpmv, write_llm_folder
    from .runtime.minicpmv import IMAGE_MARKER

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
    entry = manifest_entry(layout, cached, rels[0], rels[1], list(_encoder_providers(ctx.target)))
    part = BundlePart([(graph, rels[0]), (positions, rels[1])], {
        "encoders": {"image": entry},
        "llm": {"image_token": {"text": IMAGE_MARKER, "id": None}, "chat_template": chat_template(layout.version)},
        "checks": {"vision": entry["check"]},
    }, ["onnxruntime"])
    mmproj = stage_minicpmv_mmproj(ctx, layout)
    if mmproj is not None:
        part.files.append((mmproj, f"llm/{mmproj.name}"))
        part.manifest["mmproj"] = {"file": f"llm/{mmproj.name}", "note": "for stock llama.cpp (llama-mtmd-cli)"}
    return part, llm


def stage_minicpmv_mmproj(ctx: BuildContext, layout: Any) -> Path | None:
    """2.6 with export.vision.mmproj: the vision side as an mmproj GGUF for stock llama.cpp's mtmd."""
    from .export.gguf.minicpmv_mmproj import NAVIT_SIDE, write_minicpmv_mmproj
    from .export.minicpmv_vision import read_vision_layout
    from .export.torch_state import safetensors_state

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


def stage_speech(ctx: BuildContext) -> BundlePart:
    """Whisper -> ONNX encoder and decoders (KV cache), checked against torch: the bundle's audio encoder."""
    from .export.onnx.whisper import export_whisper

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
             "providers": list(_encoder_providers(ctx.target))}
    return BundlePart(folder_part(out, rel_dir), {"encoders": {"audio": entry}, "checks": {"speech": cached["check"]}},
                      ["onnxruntime"])


def stage_audio_embeddings(ctx: BuildContext, aligned: Path) -> BundlePart:
    """An aligned folder with an audio encoder: encoder + projector -> ONNX, checked against torch. The
    bundle's audio parts then enter the LLM as embedding rows (manifest `encoders.audio`, mode
    embeddings), not through a transcript."""
    from .export.llava import chat_template
    from .export.onnx.audio import export_audio
    from .vlm.folder import read_info

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
        "encoders": {"audio": {**cached, "file": rel, "providers": list(_encoder_providers(ctx.target))}},
        "llm": {"audio_token": read_info(aligned)["audio_token"],
                **({"chat_template": t} if (t := chat_template(aligned / "llm")) else {})},
        "checks": {"audio": cached["check"]},
    }, ["onnxruntime"])


def _speech_source(ctx: BuildContext) -> Path:
    """The recipe's Whisper as an HF folder: a CTranslate2 checkpoint (the embedded tiny.en) is converted once."""
    from .sources import check_hf_dir, embedded_whisper_ct2
    from .whisper_source import whisper_hf_from_ctranslate2

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


ENGINE_ARCHITECTURES = ("LlamaForCausalLM",)  # what the AWQ quantizer and the TensorRT-LLM writer carry


def wants_engines(ctx: BuildContext, hf_dir: Path) -> bool:
    from .export.llava import read_config

    if not (ctx.recipe.export.engines.enabled and "trtllm" in ctx.target.backends and ctx.target.cuda_arch):
        return False
    arch = (read_config(hf_dir).get("architectures") or ["?"])[0]
    if arch not in ENGINE_ARCHITECTURES:
        ctx.console.print(f"[yellow]-[/] no TensorRT artifacts: the AWQ and TensorRT-LLM writers carry "
                          f"{', '.join(ENGINE_ARCHITECTURES)}, not {arch}; the bundle runs its GGUF")
        return False
    return True


def stage_dequantize_awq(ctx: BuildContext, awq_dir: Path) -> Path:
    """A pre-quantized AWQ source -> fp16 HF folder for the GGUF path (its INT4 values dequantized exactly)."""
    from .export.awq import dequantize_awq_folder

    out = ctx.root / "awq-dequantized"
    inputs = sha256_json(["awq-dequantized", __version__, folder_fingerprint(awq_dir)])
    if up_to_date(ctx, out, inputs, out.name) is None:
        with ctx.console.status("dequantizing the AWQ checkpoint for the GGUF export"), atomic_dir(out) as tmp:
            dequantize_awq_folder(awq_dir, tmp)
        mark_done(out, inputs, {})
    return out


def stage_awq(ctx: BuildContext, hf_dir: Path) -> tuple[Path, dict[str, Any]]:
    """AWQ INT4 (activation-aware scales, zero points) -> an HF AWQ GEMM checkpoint; AWQ must beat
    round-to-nearest INT4 on held-out text or the stage fails."""
    from .export.awq import check_awq, group_size_for, quantize_awq, write_hf_awq
    from .export.llava import read_config

    spec = ctx.recipe.export.engines
    out = ctx.root / "export" / "awq-int4"
    inputs = sha256_json(["awq", __version__, folder_fingerprint(hf_dir), spec.group_size, spec.clip])
    if (cached := up_to_date(ctx, out, inputs, out.name)) is not None:
        return out, cached
    from types import SimpleNamespace

    config = read_config(hf_dir)
    group = group_size_for(SimpleNamespace(**config), spec.group_size)
    with ctx.console.status(f"AWQ INT4 (group {group}): scale search on calibration text, layer by layer"):
        result = quantize_awq(hf_dir, group, clip=spec.clip)
    numbers = result.numbers()
    check_awq(result)
    write_hf_awq(result, hf_dir, out)
    ppl = numbers.get("perplexity", {})
    ctx.console.print(f"[green]✓[/] awq-int4 (group {group}): perplexity fp {ppl.get('fp', 0):.2f}, "
                      f"AWQ {ppl.get('awq', 0):.2f}, round-to-nearest {ppl.get('rtn', 0):.2f}")
    mark_done(out, inputs, numbers)
    return out, numbers


def stage_engines(ctx: BuildContext, hf_dir: Path, awq_source: Path | None = None,
                  image_rows: int | None = None) -> BundlePart:
    """AWQ INT4 -> TensorRT-LLM checkpoint + engine plan and build script (finished on the device,
    or here when TensorRT-LLM is installed); and the TensorRT Edge-LLM export. A pre-quantized
    AWQ source (`awq_source`) is used as it is, never quantized again. `image_rows`: the image
    encoder's rows per image, which size the engine's prompt table."""
    from .export.engine_plan import plan_engine, run_build
    from .export.llava import read_config
    from .export.trtllm import write_trtllm_checkpoint
    from .memory_plan import model_size

    if awq_source is not None:
        awq_dir, awq = awq_source, {"pre_quantized": True, "source": str(awq_source),
                                    "group_size": read_config(awq_source)["quantization_config"]["group_size"]}
    else:
        awq_dir, awq = stage_awq(ctx, hf_dir)
    ckpt = ctx.root / "export" / "trtllm-ckpt"
    inputs = sha256_json(["trtllm-ckpt", __version__, folder_fingerprint(awq_dir)])
    if up_to_date(ctx, ckpt, inputs, ckpt.name) is None:
        write_trtllm_checkpoint(awq_dir, ckpt)
        mark_done(ckpt, inputs, {})
    size = ctx.size or model_size(read_config(hf_dir), ctx.recipe.name)
    plan = plan_engine(size, ctx.target, ctx.recipe.runtime.n_ctx, "int4_awq", rows_per_image=image_rows or None,
                       encoder_dtype=ctx.recipe.export.vision.dtype)
    ctx.console.print(f"engine plan: {plan.max_batch_size} sequence(s) of {plan.max_seq_len} tokens, prompt table "
                      f"{plan.max_prompt_embedding_table_size} rows, KV cache {plan.kv_cache_budget_gb:.2f} GB "
                      f"({plan.kv_cache_free_gpu_mem_fraction:.0%} of the {plan.free_after_engine_gb:.2f} GB free "
                      f"after the engine)", soft_wrap=True, highlight=False)
    plan_dir = ctx.root / "export" / f"engine-plan-{ctx.target.name}"
    build = run_build(plan, plan_dir, ckpt_dir="../trtllm-ckpt", engine_dir="engine")
    ctx.console.print(f"[green]✓[/] TensorRT-LLM checkpoint and engine plan ({'engine built' if build['built'] else 'run llm/engine-plan/build.sh on the device'})")
    files = (folder_part(awq_dir, "llm/awq-int4") + folder_part(ckpt, "llm/trtllm-ckpt")
             + folder_part(plan_dir, "llm/engine-plan"))
    engines: dict[str, Any] = {"trtllm": {
        "checkpoint": "llm/trtllm-ckpt", "awq": "llm/awq-int4", "plan": "llm/engine-plan/plan.json",
        "build_script": "llm/engine-plan/build.sh", "built": build["built"],
        "build_command": plan.build_command("../trtllm-ckpt", "engine"),
    }}
    checks: dict[str, Any] = {"awq": awq}
    if ctx.recipe.export.engines.edgellm and _edgellm_installed(ctx):
        engines["edgellm"] = {}
        for variant, source in (("fp16", hf_dir), ("int4", awq_dir)):
            edge, edge_dir = stage_edgellm(ctx, source, plan, variant)
            files += [(f, f"edgellm/{variant}/{f.relative_to(edge_dir)}")
                      for f in sorted(edge_dir.rglob("*")) if f.is_file()]
            engines["edgellm"][variant] = edge
    return BundlePart(files, {"engines": engines, "checks": checks}, ["trtllm"])


def _edgellm_installed(ctx: BuildContext) -> bool:
    from .errors import MissingDependencyError
    from .export.edgellm import edgellm_python

    try:
        edgellm_python()
        return True
    except MissingDependencyError as exc:  # optional: the bundle keeps its TensorRT-LLM checkpoint
        ctx.console.print(f"[yellow]-[/] no TensorRT Edge-LLM export: {exc} (or set export.engines.edgellm: false)")
        return False


def stage_edgellm(ctx: BuildContext, source: Path, plan: Any, variant: str) -> tuple[dict[str, Any], Path]:
    """TensorRT Edge-LLM's ONNX export (its own venv), checked; llm_build runs on the device.
    `variant` fp16 exports the HF folder; int4 exports our AWQ checkpoint, whose INT4 weights the
    exporter takes as they are (Int4GroupwiseGemm plugin nodes)."""
    from .export.edgellm import device_build_command, export_edgellm

    out = ctx.root / "export" / f"edgellm-{variant}"
    inputs = sha256_json(["edgellm", __version__, variant, folder_fingerprint(source)])
    if (cached := up_to_date(ctx, out, inputs, out.name)) is None:
        with ctx.console.status(f"exporting for TensorRT Edge-LLM ({variant}, tensorrt-edgellm-export)"):
            result = export_edgellm(source, out, "fp16", quantization="int4_awq" if variant == "int4" else None)
        cached = result.manifest()
        mark_done(out, inputs, cached)
    folder = f"edgellm/{variant}"
    entry = {**{k: v for k, v in cached.items() if k != "path"}, "folder": folder,
             "device_build_command": device_build_command(folder, f"{folder}-engine", plan.max_input_len,
                                                          plan.max_seq_len, plan.max_batch_size)}
    return entry, out


def stage_mmproj(ctx: BuildContext, hf_dir: Path) -> Path | None:
    """The vision side as an mmproj GGUF, so the bundle also runs in stock llama.cpp (CLIP towers only)."""
    from .export.gguf.mmproj import write_mmproj
    from .export.llava import read_config

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


def stage_export_gguf(ctx: BuildContext, hf_dir: Path) -> tuple[Path, dict[str, Any]]:
    """HF folder -> unquantized GGUF, checked against torch; fails when out of tolerance."""
    from .export.gguf import convert_hf_to_gguf

    spec = ctx.recipe.export
    out = ctx.root / "export" / f"model-{spec.gguf.outtype}.gguf"
    inputs = sha256_json(
        ["gguf", __version__, folder_fingerprint(hf_dir), spec.gguf.model_dump(), spec.verify.model_dump()]
    )
    if (cached := up_to_date(ctx, out, inputs, out.name)) is not None:
        cached.setdefault("weights_digest", weights_digest(hf_dir))  # stamps written before adapters existed
        return out, cached

    from rich.progress import Progress

    with Progress(console=ctx.console, transient=True) as bar:
        task = bar.add_task(f"converting to {out.name}", total=None)
        info = convert_hf_to_gguf(
            hf_dir, out, spec.gguf.outtype, name=ctx.recipe.name, tokenizer_pre=spec.gguf.tokenizer_pre,
            progress=lambda i, n: bar.update(task, completed=i, total=n),
        )
    check = _check(ctx, hf_dir, out)
    # what a LoRA adapter for this bundle must have been trained on (vishwamai_edge/adapters.py)
    result = {"format": spec.gguf.outtype, "tensor_types": info.tensor_types, "check": check,
              "weights_digest": weights_digest(hf_dir)}
    v = spec.verify
    if check["max_abs_diff"] > v.tolerance or check["top1_agreement"] < v.min_top1_agreement:
        out.unlink()
        raise ExportError(
            f"{out.name} does not match the torch model: max |logit diff| {check['max_abs_diff']:.4g} "
            f"(tolerance {v.tolerance}), top-1 agreement {check['top1_agreement']:.0%} "
            f"(need {v.min_top1_agreement:.0%})"
        )
    if check["tokenizer_agreement"] < 1.0:
        out.unlink()
        share = f"{out.name}: llama.cpp tokenizes {1 - check['tokenizer_agreement']:.0%} of the check prompts"
        if check.get("tokenizer_reference") == "sentencepiece":
            cause = (" differently from SentencePiece (tokenizer.model): the GGUF's special-token types "
                     "or normalisation (dummy prefix) differ from the model's; please report a bug")
        elif check.get("tokenizer_kind") == "sentencepiece":
            cause = (" differently from the HF tokenizer: the GGUF's special-token types or normalisation "
                     "(space prefix) differ from tokenizer.json's; please report a bug")
        else:
            cause = " differently from the HF tokenizer; set export.gguf.tokenizer_pre in the recipe"
        raise ExportError(share + cause)
    mark_done(out, inputs, result)
    _report(ctx, out, check)
    return out, result

def stage_imatrix(ctx: BuildContext, hf_dir: Path) -> Path:
    """Importance matrix from calibration text, for the quantizer (computed once)."""
    import numpy as np

    from .export.imatrix import imatrix_for

    out = ctx.root / "export" / "imatrix.npz"
    inputs = sha256_json(["imatrix", __version__, folder_fingerprint(hf_dir)])
    if cached_result(out, inputs) is not None:
        return out
    reference = ctx.reference(hf_dir)
    with ctx.console.status("computing the importance matrix on calibration text"):
        data = imatrix_for(hf_dir, reference.model, reference.tokenizer)
    with atomic_file(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, **data)
    mark_done(out, inputs, {"tensors": len(data)})
    return out


def stage_quantize(ctx: BuildContext, hf_dir: Path, source: Path, quant: str) -> tuple[Path, dict[str, Any]]:
    import numpy as np

    from .export.quantize import quantize_gguf

    out = source.with_name(f"model-{quant}.gguf")
    use_imatrix = ctx.recipe.export.gguf.imatrix
    inputs = sha256_json(["quantize", __version__, _stamp_path(source).read_text(), quant, use_imatrix,
                          ctx.recipe.export.verify.model_dump()])
    if (cached := up_to_date(ctx, out, inputs, out.name)) is not None:
        return out, cached
    imatrix = dict(np.load(stage_imatrix(ctx, hf_dir))) if use_imatrix else None
    with ctx.console.status(f"quantizing to {quant} with llama.cpp"):
        types = quantize_gguf(source, out, quant, n_threads=ctx.n_threads or 0, imatrix=imatrix)
    check = _check(ctx, hf_dir, out)
    need = ctx.recipe.export.verify.quant_min_top1_agreement
    if check["top1_agreement"] < need:
        out.unlink()
        raise ExportError(
            f"{out.name}: top-1 agreement with the torch model is {check['top1_agreement']:.0%}, "
            f"below export.verify.quant_min_top1_agreement ({need:.0%})"
        )
    result = {"format": quant, "tensor_types": types, "imatrix": use_imatrix, "check": check}
    mark_done(out, inputs, result)
    _report(ctx, out, check)
    return out, result

def _check(ctx: BuildContext, hf_dir: Path, gguf_path: Path) -> dict[str, Any]:
    from .export.verify import check_gguf

    reference = ctx.reference(hf_dir)
    with ctx.console.status(f"checking {gguf_path.name} against torch"):
        return check_gguf(reference, gguf_path, ctx.recipe.export.verify.prompts, ctx.n_threads).to_dict()

def _report(ctx: BuildContext, path: Path, check: dict[str, Any]) -> None:
    mb = path.stat().st_size / 1e6
    ctx.console.print(
        f"[green]✓[/] {path.name} {mb:.1f} MB: max |Δlogit| {check['max_abs_diff']:.4g}, "
        f"top-1 agreement {check['top1_agreement']:.0%}, tokenizer agreement {check['tokenizer_agreement']:.0%}"
    )

@dataclass
class BundlePart:
    """What a stage adds to the bundle beside the LLM: files (source -> path in the bundle) and
    manifest entries, merged one level deep (e.g. `encoders.image`, `llm.image_token`)."""

    files: list[tuple[Path, str]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    backends: list[str] = field(default_factory=list)


def vision_part(ctx: BuildContext, encoder: Path, entry: dict[str, Any], image_token: dict[str, Any],
                template: str | None, mmproj: Path | None) -> BundlePart:
    rel = f"encoders/{encoder.name}"
    part = BundlePart([(encoder, rel)], {
        "encoders": {"image": {**entry, "file": rel, "providers": list(_encoder_providers(ctx.target))}},
        "llm": {"image_token": image_token, **({"chat_template": template} if template else {})},
        "checks": {"vision": entry["check"]},
    }, ["onnxruntime"])
    if mmproj is not None:
        part.files.append((mmproj, f"llm/{mmproj.name}"))
        part.manifest["mmproj"] = {"file": f"llm/{mmproj.name}", "note": "for stock llama.cpp (llama-mtmd-cli, Ollama)"}
    return part


def folder_part(folder: Path, rel_dir: str) -> list[tuple[Path, str]]:
    return [(f, f"{rel_dir}/{f.name}") for f in sorted(folder.iterdir()) if f.is_file()]


def stage_package(
    ctx: BuildContext, gguf_path: Path, quant: str, checks: dict[str, Any], out_dir: Path,
    parts: list[BundlePart] | None = None, plan: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the bundle folder; the manifest is written last, then the folder renamed."""
    rel = f"llm/{gguf_path.name}"
    parts = parts or []
    files = [(gguf_path, rel)] + [f for part in parts for f in part.files]
    with atomic_dir(out_dir) as tmp:
        for src, dst in files:
            (tmp / dst).parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(src, tmp / dst)
        manifest: dict[str, Any] = {
            "name": f"{ctx.recipe.name}-{ctx.target.name}-{quant}",
            "recipe": ctx.recipe.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "target": {
                "name": ctx.target.name,
                "memory_gb": ctx.target.memory_gb,
                "memory_bandwidth_gbs": ctx.target.memory_bandwidth_gbs,
                "cuda_arch": ctx.target.cuda_arch,
            },
            "backends": list(dict.fromkeys(["llamacpp"] + [b for part in parts for b in part.backends])),
            "llm": {"backend": "llamacpp", "format": "gguf", "quant": quant, "file": rel,
                    "tensor_types": checks[quant]["tensor_types"],
                    "weights_digest": next((c["weights_digest"] for c in checks.values() if "weights_digest" in c),
                                           None)},
            "checks": {name: c["check"] for name, c in checks.items()},
            "runtime": ctx.recipe.runtime.model_dump(),
            "source": {"kind": ctx.recipe.source.kind,
                       "path": str(ctx.recipe.source.path) if ctx.recipe.source.path else None},
            "versions": _versions(),
            "memory_plan": plan,
        }
        for part in parts:
            for key, value in part.manifest.items():
                if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                    manifest[key] = {**manifest[key], **value}
                else:
                    manifest[key] = value
        write_manifest(tmp, manifest, [dst for _, dst in files])
        manifest = json.loads((tmp / "manifest.json").read_text())
    return manifest


def _encoder_providers(target: TargetProfile) -> tuple[str, ...]:
    # CUDA where the target has an NVIDIA GPU; ONNX Runtime drops what its build lacks
    if target.cuda_arch:
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same disk: no second copy of the weights
    except OSError:
        shutil.copy2(src, dst)

def _versions() -> dict[str, str]:
    out = {"vishwamai-edge": __version__, "python": platform.python_version()}
    for dist in ("llama_cpp_python", "gguf", "transformers", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out

# -- composition ---------------------------------------------------------------------------
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
    from .export.awq import is_awq_checkpoint

    awq_source = None
    if not recipe.source.use_as_is and is_awq_checkpoint(hf_dir):  # a published *-AWQ model
        awq_source, hf_dir = hf_dir, stage_dequantize_awq(ctx, hf_dir)
    if recipe.source.use_as_is:  # a pre-quantized GGUF, bundled byte for byte and checked without torch
        from .sources import check_as_is, finish_manifest

        with console.status(f"checking {hf_dir.name} with llama.cpp (bundled as is)"):
            gguf_quant, entry = check_as_is(hf_dir, recipe.export.verify.prompts, root, n_threads)
        out_dir = root / f"{target.name}-{gguf_quant}"
        stage_package(ctx, hf_dir, gguf_quant, {gguf_quant: entry}, out_dir)
        console.print(f"[bold green]bundle ready:[/] {out_dir}")
        return BuildResult(out_dir, finish_manifest(out_dir, root, recipe.source), ctx.skipped)
    plan = stage_memory_plan(ctx, hf_dir, quant)
    checks: dict[str, Any] = {}
    if recipe.finetune is not None and recipe.finetune.method == "align":
        hf_dir = stage_align(ctx, hf_dir)
    elif recipe.finetune is not None:
        hf_dir = stage_merge(ctx, hf_dir, stage_finetune(ctx, hf_dir))
        checks["merge"] = {"check": json.loads((hf_dir / "merge_check.json").read_text())}
    parts: list[BundlePart] = []
    if is_aligned(hf_dir):  # a VLM made here: its encoder + projector to ONNX, its LLM as any other
        from .vlm.folder import read_info

        info = read_info(hf_dir)
        if info["encoder"].get("modality") == "audio":
            parts.append(stage_audio_embeddings(ctx, hf_dir))
        else:
            encoder, entry = stage_vision(ctx, hf_dir)
            from .export.llava import chat_template

            parts.append(vision_part(ctx, encoder, entry, info["image_token"], chat_template(hf_dir / "llm"), None))
        hf_dir = hf_dir / "llm"
    elif is_llava(hf_dir):
        from .export.llava import chat_template, image_token

        encoder, entry = stage_vision(ctx, hf_dir)
        parts.append(vision_part(ctx, encoder, entry, image_token(hf_dir).to_dict(), chat_template(hf_dir),
                                 stage_mmproj(ctx, hf_dir)))
        hf_dir = stage_split_llm(ctx, hf_dir)
    elif is_minicpmv(hf_dir):
        part, hf_dir = stage_minicpmv(ctx, hf_dir)
        parts.append(part)
    elif is_vila(hf_dir):
        part, hf_dir, vila_awq = stage_vila(ctx, hf_dir)
        parts.append(part)
        awq_source = awq_source or vila_awq
    if recipe.speech is not None:
        parts.append(stage_speech(ctx))
    if wants_engines(ctx, hf_dir):
        image = next((p.manifest["encoders"]["image"] for p in parts if "image" in p.manifest.get("encoders", {})),
                     None)
        parts.append(stage_engines(ctx, hf_dir, awq_source, image["n_tokens"] if image else None))
    base, base_result = stage_export_gguf(ctx, hf_dir)
    checks[recipe.export.gguf.outtype] = base_result
    quants = list(dict.fromkeys([*recipe.export.gguf.quants, quant]))
    for q in quants:
        if q == recipe.export.gguf.outtype:
            continue
        _, checks[q] = stage_quantize(ctx, hf_dir, base, q)
    bundle_gguf = base if quant == recipe.export.gguf.outtype else base.with_name(f"model-{quant}.gguf")
    name = target.name if quant == target.gguf_quant else f"{target.name}-{quant}"
    out_dir = root / name
    manifest = stage_package(ctx, bundle_gguf, quant, checks, out_dir, parts, plan)
    if recipe.source.kind == "hub":  # the commit the weights came from
        from .sources import finish_manifest

        manifest = finish_manifest(out_dir, root, recipe.source)
    console.print(f"[bold green]bundle ready:[/] {out_dir}")
    return BuildResult(out_dir, manifest, ctx.skipped)
