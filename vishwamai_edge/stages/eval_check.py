"""The recipe's `checks.eval`: the bundle's GGUF scored against the unquantized export (`eval`'s numbers,
with the recipe's KV-cache type) before the bundle is packaged. A missed bar fails the build in one line
naming the report; no bundle is written. The numbers go into the manifest's checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ExportError
from ..fsutil import sha256_file, sha256_json
from .context import BuildContext
from .stamps import mark_done, stamp_path, up_to_date


def stage_eval_check(ctx: BuildContext, base: Path, model: Path) -> dict[str, Any] | None:
    spec = ctx.recipe.checks.eval
    if spec is None:
        return None
    from ..eval.runner import Row, run_eval
    from ..runtime.options import RuntimeOptions

    text = ctx.recipe.resolve(spec.text) if spec.text else None
    tasks = ctx.recipe.resolve(spec.tasks) if spec.tasks else None
    out = ctx.root / "eval" / model.stem
    kv = ctx.recipe.runtime.kv_type
    # the bars are not inputs: changing one judges the same numbers again
    inputs = sha256_json(["eval", __version__, stamp_path(base).read_text(), stamp_path(model).read_text(), kv,
                          spec.n_ctx,
                          sha256_file(text) if text else None, sha256_file(tasks) if tasks else None])
    result = up_to_date(ctx, out, inputs, f"eval of {model.name}")
    if result is None:
        ctx.console.print(f"checks.eval: {model.name} against {base.name}, KV cache {kv}")
        report = run_eval([Row(base), Row(model, kv)], out, text, spec.n_ctx, RuntimeOptions(n_threads=ctx.n_threads),
                          tasks, console=ctx.console).report
        ref, row = report["bundles"]
        result = {"against": base.name, "kv_type": kv, "n_ctx": spec.n_ctx, "text": report["text"],
                  "perplexity": row["perplexity"], "reference_perplexity": ref["perplexity"],
                  "ppl_ratio": row["perplexity"] / ref["perplexity"], "kld_mean": row.get("kld_mean", 0.0),
                  "kld_p99": row.get("kld_p99", 0.0), "same_top": row.get("same_top", 1.0)}
        if "tasks" in row:
            result["accuracy"] = row["tasks"]["accuracy"]
        mark_done(out, inputs, result)
    missed = [f"{what} {value:.4g} is {side} {name} {bar:.4g}" for what, value, side, name, bar in (
        ("mean KLD", result["kld_mean"], "over", "max_kld_mean", spec.max_kld_mean),
        ("the perplexity ratio", result["ppl_ratio"], "over", "max_ppl_ratio", spec.max_ppl_ratio),
        ("task accuracy", result.get("accuracy", 1.0), "under", "min_accuracy", spec.min_accuracy),
    ) if bar is not None and (value > bar if side == "over" else value < bar)]
    if missed:
        raise ExportError(f"checks.eval: {model.name} against {base.name}: {'; '.join(missed)} "
                          f"(report: {out / 'report.md'}); no bundle written")
    ctx.console.print(f"[green]✓[/] checks.eval: mean KLD {result['kld_mean']:.4f}, "
                      f"perplexity x{result['ppl_ratio']:.4f}"
                      + (f", accuracy {result['accuracy']:.1%}" if "accuracy" in result else ""))
    return result
