"""What every stage gets (`BuildContext`) and what a stage adds to the bundle beside the LLM (`BundlePart`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from ..recipe import Recipe
from ..targets import TargetProfile


@dataclass
class BuildContext:
    recipe: Recipe
    target: TargetProfile
    root: Path  # build/<recipe>
    console: Console
    n_threads: int | None = None
    _reference: Any = None
    skipped: list[str] = field(default_factory=list)
    size: Any = None  # memory_plan.ModelSize of the source, set by the memory-plan stage

    def reference(self, hf_dir: Path):
        """The torch model, loaded only when a check actually has to run."""
        if self._reference is None:
            from ..export.verify import TorchReference

            with self.console.status("loading the torch reference model"):
                self._reference = TorchReference(hf_dir)
        return self._reference


@dataclass
class BundlePart:
    """What a stage adds to the bundle beside the LLM: files (source -> path in the bundle) and
    manifest entries, merged one level deep (e.g. `encoders.image`, `llm.image_token`)."""

    files: list[tuple[Path, str]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    backends: list[str] = field(default_factory=list)


def folder_part(folder: Path, rel_dir: str) -> list[tuple[Path, str]]:
    return [(f, f"{rel_dir}/{f.name}") for f in sorted(folder.iterdir()) if f.is_file()]


def encoder_providers(target: TargetProfile) -> list[str]:
    # CUDA where the target has an NVIDIA GPU; ONNX Runtime drops what its build lacks
    if target.cuda_arch:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
