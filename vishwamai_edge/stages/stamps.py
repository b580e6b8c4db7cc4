"""A stage's bookkeeping: the stamp beside its artifact (the hash of its inputs and its result), so a
rerun skips every stage whose stamp matches and an interrupted build resumes where it stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fsutil import write_json

if TYPE_CHECKING:
    from .context import BuildContext

STAMP_SUFFIX = ".stamp.json"


def stamp_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + STAMP_SUFFIX)


def cached_result(artifact: Path, inputs: str) -> dict[str, Any] | None:
    stamp = stamp_path(artifact)
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
    write_json(stamp_path(artifact), {"inputs": inputs, "size": size, "result": result})


def folder_fingerprint(folder: Path, recursive: bool = False) -> list[tuple[str, int, int]]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()
    )
