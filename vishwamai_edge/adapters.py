"""`build --add-to BUNDLE`: a recipe's LoRA fine-tune shipped as a LoRA GGUF inside an existing bundle.

The base model file is not touched: the adapter goes to `adapters/NAME.gguf`, the manifest gains
the file (size, sha256) and an `adapters.NAME` entry, and is rewritten last, atomically. Stages
(under build/<recipe>/, resumable like `build`'s):

    source -> finetune/adapter/ (LoRA) -> merged/ (the torch reference)
    adapter/ -> export/adapter-NAME-f16.gguf                   (export/gguf/lora.py)
    source -> export/base-f16.gguf; check: llama.cpp base F16 + adapter vs merged torch (tolerance,
              top-1), and the bundle's own model file + adapter vs merged torch (top-1)

An adapter fits a bundle only if it was trained on the very weights the bundle's GGUF was made
from: the bundle records their digest (`llm.weights_digest`, fsutil.weights_digest), the adapter
the digest of its training base; they must be equal.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from . import __version__
from .errors import ExportError, RecipeError
from .fsutil import clean_stale_temps, sha256_json, weights_digest
from .recipe import Recipe
from .targets import get_target

ADAPTER_DIR = "adapters"
METHODS = ("lora", "qlora", "cpt")


@dataclass
class AdapterResult:
    bundle: Path
    name: str
    entry: dict[str, Any]


def add_adapter(recipe: Recipe, bundle_dir: Path, out_root: Path = Path("build"), n_threads: int | None = None,
                console: Console | None = None) -> AdapterResult:
    from .export.gguf import convert_hf_to_gguf
    from .export.gguf.lora import write_lora_gguf
    from .families import family_for
    from .runtime.bundle import Bundle, add_files
    from .stages.context import BuildContext
    from .stages.finetune import stage_finetune, stage_merge
    from .stages.source import stage_source
    from .stages.stamps import mark_done, stamp_path, up_to_date

    console = console or Console(stderr=True)
    spec = recipe.finetune
    if spec is None or spec.method not in METHODS:
        raise RecipeError(f"{recipe.path}: finetune.method: --add-to ships a LoRA adapter; the recipe needs a "
                          f"finetune section with method {', '.join(METHODS)}")
    name = recipe.export.adapter.name or recipe.name
    bundle = Bundle.load(bundle_dir)  # every file checked against the manifest first
    if bundle.bare_file is not None:
        raise ExportError(f"{bundle_dir}: adapters go into a bundle folder with a manifest, not a bare GGUF")
    base_digest = bundle.llm.weights_digest
    if not base_digest:
        raise ExportError(f"{bundle_dir}: its manifest does not say which weights its model was made from "
                          "(built before adapters existed): build the bundle again, then add the adapter")
    root = Path(out_root) / recipe.name
    for sub in (root, root / "export", root / "finetune"):
        clean_stale_temps(sub)
    ctx = BuildContext(recipe, get_target(bundle.manifest.target.name), root,
                       console, n_threads)
    hf_dir = stage_source(ctx)
    if family_for(hf_dir).name != "text" or "image" in bundle.manifest.encoders:
        # the projector lives in the ONNX encoder and the LLM was split out of the VLM folder: a
        # llama.cpp LoRA cannot carry a projector change, and its names would not match the split LLM
        raise ExportError(f"{bundle_dir}: adapters for vision-language bundles cannot be shipped this way (a "
                          "llama.cpp LoRA cannot carry the projector); build the fine-tuned recipe as its own bundle")
    with console.status("hashing the base weights"):
        digest = weights_digest(hf_dir)
    if digest != base_digest:
        raise ExportError(f"the recipe's base model ({hf_dir}) is not the one {bundle_dir} was built from "
                          "(their weights differ): an adapter only fits the weights it was trained on")
    adapter_dir = stage_finetune(ctx, hf_dir)
    merged = stage_merge(ctx, hf_dir, adapter_dir)

    a = recipe.export.adapter
    lora = root / "export" / f"adapter-{name}-{a.outtype}.gguf"
    base_gguf = root / "export" / "base-f16.gguf"
    bundle_model = bundle.manifest.files[bundle.llm.file].sha256
    inputs = sha256_json(["lora-gguf", __version__, stamp_path(adapter_dir).read_text(), a.model_dump(), digest,
                          recipe.export.verify.model_dump(), bundle_model])
    if (entry := up_to_date(ctx, lora, inputs, lora.name)) is None:
        with console.status(f"writing {lora.name}"):
            info = write_lora_gguf(adapter_dir, hf_dir, lora, a.outtype, base_digest=digest)
        if up_to_date(ctx, base_gguf, digest, base_gguf.name) is None:
            with console.status("converting the base to F16 GGUF for the adapter's check"):
                convert_hf_to_gguf(hf_dir, base_gguf, "f16", name=f"{recipe.name}-base")
            mark_done(base_gguf, digest, {})
        entry = {**info.to_dict(), "scale": a.scale, "method": spec.method, "recipe": recipe.name,
                 "check": check_adapter(ctx, merged, base_gguf, bundle.llm_path(), lora, a.scale,
                                        bundle.llm.quant or "?")}
        mark_done(lora, inputs, entry)
    rel = f"{ADAPTER_DIR}/{name}.gguf"
    dst = bundle.root / rel
    dst.parent.mkdir(exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(lora, tmp)
    os.replace(tmp, dst)
    entry = {**entry, "file": rel}
    add_files(bundle.root, [rel], {"adapters": {name: entry}})
    c = entry["check"]
    console.print(f"[green]✓[/] adapter {name!r} ({entry['bytes'] / 1e6:.1f} MB) in {bundle.root}: base F16 + "
                  f"adapter vs merged torch max |Δlogit| {c['f16']['max_abs_diff']:.4g}, top-1 "
                  f"{c['f16']['top1_agreement']:.0%}; on the bundle's {c['bundle']['quant']} top-1 "
                  f"{c['bundle']['top1_agreement']:.0%}")
    return AdapterResult(bundle.root, name, entry)


def check_adapter(ctx: Any, merged: Path, base_gguf: Path, bundle_gguf: Path, lora: Path, scale: float,
                  quant: str) -> dict[str, Any]:
    """The adapter in llama.cpp against the merged torch model, on the F16 base and on the bundle's own
    model file; refused (and removed) outside the recipe's verify limits."""
    from .export.verify import check_gguf

    v = ctx.recipe.export.verify
    reference = ctx.reference(merged)
    with ctx.console.status("checking the adapter in llama.cpp against the merged torch model"):
        f16 = check_gguf(reference, base_gguf, v.prompts, ctx.n_threads, adapter=(lora, scale)).to_dict()
        on_bundle = check_gguf(reference, bundle_gguf, v.prompts, ctx.n_threads, adapter=(lora, scale)).to_dict()
    problem = None
    if f16["max_abs_diff"] > v.tolerance or f16["top1_agreement"] < v.min_top1_agreement:
        problem = (f"base F16 + adapter differs from the merged model: max |logit diff| {f16['max_abs_diff']:.4g} "
                   f"(tolerance {v.tolerance}), top-1 {f16['top1_agreement']:.0%} (need {v.min_top1_agreement:.0%})")
    elif on_bundle["top1_agreement"] < v.quant_min_top1_agreement:
        problem = (f"the bundle's model + adapter agrees with the merged model on {on_bundle['top1_agreement']:.0%} "
                   f"of top-1 tokens, below export.verify.quant_min_top1_agreement ({v.quant_min_top1_agreement:.0%})")
    if problem:
        lora.unlink(missing_ok=True)
        raise ExportError(f"{lora.name}: {problem}")
    return {"f16": f16, "bundle": {**on_bundle, "quant": quant}}
