"""The training stages: LoRA / QLoRA / CPT, align (encoder + projector), and the merge of an adapter
into its base; `vishwamai-edge finetune` runs them alone, with the same folders and stamps as `build`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from .. import __version__
from ..fsutil import clean_stale_temps, sha256_json
from ..recipe import Recipe
from .context import BuildContext
from .source import stage_source
from .stamps import folder_fingerprint, mark_done, stamp_path, up_to_date


def stage_finetune(ctx: BuildContext, hf_dir: Path, resume: bool | None = None, teacher: Path | None = None) -> Path:
    """LoRA / QLoRA / CPT / GRPO / distill on the recipe's dataset -> finetune/adapter/ (with `full`:
    finetune/model/); continues from its checkpoints.

    resume=None (build): continue a checkpoint of the same settings, else start over.
    """
    from ..train.finetune import finetune, output_dir, run_fingerprint, spec_of
    from ..train.grpo import grpo

    spec = spec_of(ctx.recipe)
    folder = ctx.root / "finetune"
    out = output_dir(folder, spec)
    base = [__version__, folder_fingerprint(hf_dir)] + ([folder_fingerprint(teacher)] if teacher else [])
    inputs = run_fingerprint(ctx.recipe, base, folder)
    if up_to_date(ctx, out, inputs, "finetune") is not None:
        return out
    if spec.method == "grpo":
        result = grpo(ctx.recipe, hf_dir, folder, inputs, resume=resume, console=ctx.console)
    else:
        result = finetune(ctx.recipe, hf_dir, folder, inputs, resume=resume, console=ctx.console, teacher_dir=teacher)
    if _main_process():
        mark_done(out, inputs, {k: v for k, v in result.to_dict().items() if k != "history"})
    return out



def training_record(adapter_dir: Path) -> dict[str, Any]:
    """What the manifest's checks keep of a training run: the method, its steps and time, the last loss (or
    reward, or divergence), GRPO's held-out accuracy before and after, distillation's held-out perplexities."""
    import json

    run = json.loads((adapter_dir / "training.json").read_text())
    keep = ("method", "steps", "examples", "final_loss", "eval_loss", "seconds", "trainable_params")
    out = {k: run.get(k) for k in keep}
    if run.get("history"):
        last = run["history"][-1]
        out["last_step"] = {k: v for k, v in last.items() if k.startswith(("reward", "right", "loss", "kl"))}
    if run.get("held_out"):
        out["held_out"] = {when: {k: v for k, v in numbers.items() if k != "samples"} if isinstance(numbers, dict)
                           else numbers for when, numbers in run["held_out"].items()}
    if run.get("objective"):
        out["objective"] = run["objective"]
    return out


def stage_align(ctx: BuildContext, hf_dir: Path, resume: bool | None = None) -> Path:
    """`method: align`: frozen encoder + trained projector (+ LoRA) -> finetune/aligned/ (train/aligned_folder.py)."""
    from ..train.align import ALIGNED, align
    from ..train.finetune import run_fingerprint

    folder = ctx.root / "finetune"
    out = folder / ALIGNED
    inputs = run_fingerprint(ctx.recipe, [__version__, "align", folder_fingerprint(hf_dir)], folder)
    if up_to_date(ctx, out, inputs, "aligned") is not None:
        return out
    result = align(ctx.recipe, hf_dir, folder, inputs, resume=resume, console=ctx.console,
                   quantized_weights=quantized_weights(ctx.recipe, hf_dir, folder))
    mark_done(out, inputs, {k: v for k, v in result.to_dict().items() if k != "history"})
    return out


def quantized_weights(recipe: Recipe, hf_dir: Path, work_dir: Path) -> Callable[[], dict[str, Any]]:
    """The LLM's weights as the bundle's quantization (finetune.align.quantized_llm) leaves them, made when
    align asks: converted as the build converts, quantized by llama.cpp, dequantized back."""
    from ..export.quantize import round_trip_state

    spec = recipe.finetune
    quant = spec.align.quantized_llm if spec is not None and spec.align is not None else None
    gguf = recipe.export.gguf
    return lambda: round_trip_state(hf_dir, work_dir, str(quant), gguf.outtype, recipe.name, gguf.tokenizer_pre)



def stage_merge(ctx: BuildContext, hf_dir: Path, adapter_dir: Path) -> Path:
    """base + adapter -> merged/ (plain HF folder), checked against base + adapter unmerged."""
    from ..train.merge import merge_adapter

    spec = ctx.recipe.finetune
    assert spec is not None
    out = ctx.root / "merged"
    inputs = sha256_json(["merge", __version__, stamp_path(adapter_dir).read_text(), folder_fingerprint(hf_dir),
                          spec.merge.model_dump()])
    if up_to_date(ctx, out, inputs, "merged") is not None:
        return out
    check = merge_adapter(adapter_dir, out, hf_dir, spec.merge.prompts, spec.merge.tolerance, ctx.console)
    mark_done(out, inputs, {"check": check.to_dict()})
    return out



def stage_training(ctx: BuildContext, hf_dir: Path, teacher: Path | None, resume: bool | None = None,
                   merge: bool = True) -> tuple[Path, dict[str, Any]]:
    """The recipe's fine-tune of `hf_dir` (the source, or its pruned student; `teacher` is a distillation's,
    `stage_teacher`): the trained HF folder (merged, or whole with `full`) and its checks for the manifest.
    With merge False, a LoRA run stops at its adapter."""
    import json

    spec = ctx.recipe.finetune
    assert spec is not None
    if spec.method == "align":
        return stage_align(ctx, hf_dir, resume=resume), {}
    trained = stage_finetune(ctx, hf_dir, resume=resume, teacher=teacher)
    checks: dict[str, Any] = {"finetune": {"check": training_record(trained)}}
    # under `accelerate launch` every process trains; only the first merges
    if spec.full or not merge or not _main_process():
        return trained, checks
    merged = stage_merge(ctx, hf_dir, trained)
    checks["merge"] = {"check": json.loads((merged / "merge_check.json").read_text())}
    return merged, checks


def finetune_and_merge(
    recipe: Recipe, out_root: Path = Path("build"), resume: bool | None = None, merge: bool = True,
    console: Console | None = None,
) -> Path:
    """`vishwamai-edge finetune`: the source, prune, finetune (and merge) stages of `build`, same folders and
    stamps."""
    from ..targets import get_target
    from ..train.finetune import spec_of
    from .prune import stage_prune, stage_teacher

    spec_of(recipe)  # a recipe without a finetune section fails before anything runs
    console = console or Console(stderr=True)
    root = Path(out_root) / recipe.name
    for sub in (root, root / "finetune"):
        clean_stale_temps(sub)
    ctx = BuildContext(recipe, get_target("laptop-cpu"), root, console)  # the target plays no part here
    source_dir = stage_source(ctx)
    teacher = stage_teacher(ctx, source_dir)  # a wrong teacher fails before minutes of pruning
    hf_dir = stage_prune(ctx, source_dir) if recipe.prune is not None else source_dir
    return stage_training(ctx, hf_dir, teacher, resume=resume, merge=merge)[0]



def _main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # set by accelerate / torchrun for each process
