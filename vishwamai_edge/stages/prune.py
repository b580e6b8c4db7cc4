"""The prune stage: the source cut into a smaller student (train/prune.py) -> build/<recipe>/pruned/, checked
against the unpruned model with the same parts removed; and the teacher a distillation learns from."""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..errors import RecipeError
from ..fsutil import sha256_json
from .context import BuildContext
from .source import stage_source
from .stamps import folder_fingerprint, mark_done, up_to_date

WINDOW = 512  # calibration tokens per forward pass


def stage_prune(ctx: BuildContext, hf_dir: Path) -> Path:
    from ..train.prune import PRUNE_FILE, calibration_windows, prune_folder

    spec = ctx.recipe.prune
    assert spec is not None
    out = ctx.root / "pruned"
    tokens = calibration_tokens(ctx, hf_dir)
    windows = calibration_windows(tokens, spec.calibration_tokens, WINDOW)
    inputs = sha256_json(["prune", __version__, folder_fingerprint(hf_dir), spec.model_dump(mode="json"), windows])
    if up_to_date(ctx, out, inputs, "pruned") is not None:
        return out
    result = prune_folder(hf_dir, out, spec, windows, str(ctx.recipe.path or ctx.recipe.name), ctx.console)
    mark_done(out, inputs, result.to_dict())
    (before, after), (p0, p1) = result.layers, result.params
    ctx.console.print(f"[green]✓[/] pruned: {before} -> {after} blocks, {p0 / 1e6:.1f}M -> {p1 / 1e6:.1f}M "
                      f"parameters, calibration loss {result.loss[0]:.3f} -> {result.loss[1]:.3f} "
                      f"({out / PRUNE_FILE})")
    return out


def prune_record(pruned: Path) -> dict:
    """What the manifest's checks keep of the prune stage (its prune.json)."""
    import json

    from ..train.prune import PRUNE_FILE

    return json.loads((pruned / PRUNE_FILE).read_text())


def calibration_tokens(ctx: BuildContext, hf_dir: Path) -> list[int]:
    """The token stream that ranks what to cut: prune.calibration, else the fine-tune's training text (chats
    rendered by the model's template), else the importance-matrix samples."""
    from ..errors import quiet_transformers
    from ..train import data as D

    recipe, spec = ctx.recipe, ctx.recipe.prune
    assert spec is not None
    tokenizer = quiet_transformers().AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    if spec.calibration is not None:
        records = D.read_dataset(recipe.resolve(spec.calibration), "text")
    elif recipe.finetune is not None:
        from ..train.finetune import read_records

        records = read_records(recipe, ctx.root / "finetune")[0]
    else:
        from ..export.imatrix import calibration_samples

        return [t for sample in calibration_samples(tokenizer) for t in sample]
    out: list[int] = []
    for rec in records:
        text = rec.text if rec.text is not None else tokenizer.apply_chat_template(rec.messages, tokenize=False)
        out += tokenizer(text)["input_ids"]
        if len(out) >= spec.calibration_tokens:
            break
    if len(out) < 2:
        raise RecipeError(f"{recipe.path}: prune: the calibration text has no tokens")
    return out


def stage_teacher(ctx: BuildContext, source_dir: Path) -> Path | None:
    """The teacher of a distillation as an HF folder: finetune.distill.teacher, or the source before prune."""
    ft = ctx.recipe.finetune
    if ft is None or ft.distill is None:
        return None
    if ft.distill.teacher is None:
        return source_dir
    return stage_source(ctx, ft.distill.teacher, "teacher")
