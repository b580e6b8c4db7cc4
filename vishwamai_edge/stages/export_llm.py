"""The LLM's export stages: the memory plan against the target, HF folder -> GGUF checked against torch,
the importance matrix and the quantized GGUFs (each checked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ExportError
from ..fsutil import atomic_file, sha256_json, weights_digest
from .context import BuildContext
from .stamps import cached_result, folder_fingerprint, mark_done, stamp_path, up_to_date


def stage_memory_plan(ctx: BuildContext, quant: str) -> dict[str, Any]:
    """Weights + KV cache + encoders + runtime (`ctx.size`, the family's sizes of the source) against the
    target's memory, before any work: a bundle that cannot run there stops the build with the numbers
    and what would fit."""
    from ..memory_plan import check_fits, plan_memory

    plan = plan_memory(ctx.size, ctx.target, quant, ctx.recipe.runtime.n_ctx, "llamacpp", ctx.recipe.export.vision.dtype,
                       kv_type=ctx.recipe.runtime.kv_type)
    check_fits(plan)  # one line with the numbers and what would fit
    if ctx.target.jetson:
        ctx.console.print(f"memory plan: {plan.line()}", soft_wrap=True, highlight=False)
    return plan.to_dict()



def stage_export_gguf(ctx: BuildContext, hf_dir: Path) -> tuple[Path, dict[str, Any]]:
    """HF folder -> unquantized GGUF, checked against torch; fails when out of tolerance."""
    from ..export.gguf import convert_hf_to_gguf

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

    from ..export.imatrix import imatrix_for

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

    from ..export.quantize import quantize_gguf

    out = source.with_name(f"model-{quant}.gguf")
    use_imatrix = ctx.recipe.export.gguf.imatrix
    inputs = sha256_json(["quantize", __version__, stamp_path(source).read_text(), quant, use_imatrix,
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
    from ..export.verify import check_gguf

    reference = ctx.reference(hf_dir)
    with ctx.console.status(f"checking {gguf_path.name} against torch"):
        return check_gguf(reference, gguf_path, ctx.recipe.export.verify.prompts, ctx.n_threads).to_dict()



def _report(ctx: BuildContext, path: Path, check: dict[str, Any]) -> None:
    mb = path.stat().st_size / 1e6
    ctx.console.print(
        f"[green]✓[/] {path.name} {mb:.1f} MB: max |Δlogit| {check['max_abs_diff']:.4g}, "
        f"top-1 agreement {check['top1_agreement']:.0%}, tokenizer agreement {check['tokenizer_agreement']:.0%}"
    )
