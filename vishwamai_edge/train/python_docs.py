"""Text for distilling and pruning without a download: the Python language reference's topics, which every
Python install carries (`pydoc_data.topics`, the text `help()` shows; PSF licence). About 465,000 characters of
technical English in 79 topics; whole topics are held out, drawn by the seed, so no held-out sentence is
trained on. The text follows the Python version, so the recipe's fingerprint hashes the files written."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..fsutil import atomic_file


@dataclass(frozen=True)
class TextFiles:
    train: Path
    eval: Path


def split_topics(n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) topic texts, each list in the topics' own order."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = set(random.Random(seed).sample(names, min(n_eval, len(names) - 1)))
    return [topics[n] for n in names if n not in held], [topics[n] for n in names if n in held]


def write_python_docs(folder: Path, n_eval: int, seed: int) -> TextFiles:
    train, held = split_topics(n_eval, seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = TextFiles(folder / "train.txt", folder / "eval.txt")
    for path, texts in ((files.train, train), (files.eval, held)):
        with atomic_file(path) as tmp:
            tmp.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return files
