"""The TensorRT stages: AWQ INT4, the TensorRT-LLM checkpoint with its engine plan and build script,
and TensorRT Edge-LLM's ONNX export (each engine is built on the device, or here with TensorRT-LLM)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..fsutil import sha256_json
from .context import BuildContext, BundlePart, folder_part
from .stamps import folder_fingerprint, mark_done, up_to_date

ENGINE_ARCHITECTURES = ("LlamaForCausalLM",)  # what the AWQ quantizer and the TensorRT-LLM writer carry



def wants_engines(ctx: BuildContext, hf_dir: Path) -> bool:
    from ..export.llava import read_config

    if not (ctx.recipe.export.engines.enabled and "trtllm" in ctx.target.backends and ctx.target.cuda_arch):
        return False
    arch = (read_config(hf_dir).get("architectures") or ["?"])[0]
    if arch not in ENGINE_ARCHITECTURES:
        ctx.console.print(f"[yellow]-[/] no TensorRT artifacts: the AWQ and TensorRT-LLM writers carry "
                          f"{', '.join(ENGINE_ARCHITECTURES)}, not {arch}; the bundle runs its GGUF")
        return False
    return True



def stage_awq(ctx: BuildContext, hf_dir: Path) -> tuple[Path, dict[str, Any]]:
    """AWQ INT4 (activation-aware scales, zero points) -> an HF AWQ GEMM checkpoint; AWQ must beat
    round-to-nearest INT4 on held-out text or the stage fails."""
    from ..export.awq import check_awq, group_size_for, quantize_awq, write_hf_awq
    from ..export.llava import read_config

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
    from ..export.engine_plan import plan_engine, run_build
    from ..export.llava import read_config
    from ..export.trtllm import write_trtllm_checkpoint
    from ..memory_plan import model_size

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
    from ..errors import MissingDependencyError
    from ..export.edgellm import edgellm_python

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
    from ..export.edgellm import device_build_command, export_edgellm

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
