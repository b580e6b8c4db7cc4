"""An image encoder (tower + projector) -> ONNX checked against torch, and the bundle part that carries it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..fsutil import sha256_json
from .context import BuildContext, BundlePart, encoder_providers
from .stamps import folder_fingerprint, mark_done, up_to_date


def stage_vision(ctx: BuildContext, hf_dir: Path, nested: bool = False) -> tuple[Path, dict[str, Any]]:
    """Vision tower + projector -> ONNX at the recipe's dtype, checked against torch. `nested`: the
    weights lie in subfolders (VILA's vision_tower/, mm_projector/), which the stamp must see."""
    from ..export.onnx import export_vision

    spec = ctx.recipe.export.vision
    out = ctx.root / "export" / f"vision-{spec.dtype}.onnx"
    inputs = sha256_json(["vision", __version__, folder_fingerprint(hf_dir, recursive=nested),
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


def vision_part(ctx: BuildContext, encoder: Path, entry: dict[str, Any], image_token: dict[str, Any],
                template: str | None, mmproj: Path | None, prompt: str = "token",
                space_after_special: bool = True) -> BundlePart:
    """The encoder in the bundle with its manifest entries; `prompt`: the device's prompt planner for the
    family's placeholder (runtime/prompts: `token` for a vocabulary token, `text` for placeholder text);
    `space_after_special`: export/verify.space_after_special of the model's tokenizer."""
    rel = f"encoders/{encoder.name}"
    part = BundlePart([(encoder, rel)], {
        "encoders": {"image": {**entry, "kind": "vision", "file": rel,
                                         "providers": encoder_providers(ctx.target)}},
        "llm": {"image_token": image_token, "prompt": prompt, **({"chat_template": template} if template else {}),
                **({} if space_after_special else {"space_after_special": False})},
        "checks": {"vision": entry["check"]},
    }, ["onnxruntime"])
    if mmproj is not None:
        part.files.append((mmproj, f"llm/{mmproj.name}"))
        part.manifest["mmproj"] = {"file": f"llm/{mmproj.name}", "note": "for stock llama.cpp (llama-mtmd-cli, Ollama)"}
    return part
