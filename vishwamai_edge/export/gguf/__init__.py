"""HF folder -> GGUF, on gguf-py, one small converter class per architecture."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...errors import ExportError
from ...fsutil import atomic_file
from ...sources.folders import check_hf_dir
from . import gemma, llama, minicpm, qwen2  # noqa: F401  (registers the converters)
from .base import OUTTYPES, converter_for, supported_architectures, write_gguf
from .vocab import add_vocab

__all__ = ["OUTTYPES", "GGUFExport", "convert_hf_to_gguf", "supported_architectures"]


@dataclass
class GGUFExport:
    path: Path
    arch: str
    outtype: str
    tokenizer: str
    tensor_types: dict[str, int]


def convert_hf_to_gguf(
    hf_dir: Path,
    out_path: Path,
    outtype: str = "f16",
    name: str | None = None,
    tokenizer_pre: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> GGUFExport:
    """Convert an HF folder to a GGUF file at `out_path`, written atomically."""
    hf_dir = check_hf_dir(Path(hf_dir))
    if outtype not in OUTTYPES:
        raise ExportError(f"unknown GGUF output type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    converter = converter_for(hf_dir)
    vocab_size = converter.hparams["vocab_size"]
    kind: dict[str, str] = {}

    def vocab(writer) -> None:
        kind["tokenizer"] = add_vocab(writer, hf_dir, vocab_size, tokenizer_pre)

    with atomic_file(Path(out_path)) as tmp:
        counts = write_gguf(converter, tmp, outtype, vocab, name or hf_dir.name, progress)
    return GGUFExport(Path(out_path), converter.arch_name, outtype, kind["tokenizer"], counts)
