"""The last stage: the bundle folder assembled (hard links where the disk allows), the manifest written
last, then the folder renamed into place."""

from __future__ import annotations

import json
import os
import platform
import shutil
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import __version__
from ..fsutil import atomic_dir
from ..runtime.bundle import write_manifest
from .context import BuildContext, BundlePart


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
            # the recipe's settings and the target's slots and draft length: the device reads no target table
            "runtime": {**ctx.recipe.runtime.model_dump(), "parallel": ctx.target.parallel,
                        "draft_max": ctx.target.draft_max},
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
