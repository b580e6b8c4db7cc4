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


def split_topics(eval_chars: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) topic texts, each list in the topics' own order; topics drawn in a seeded order are held
    out until they hold `eval_chars` characters (always one, never all)."""
    from pydoc_data.topics import topics

    first = {topics[n]: n for n in sorted(topics, reverse=True)}  # some topics repeat another's text: once each
    names = sorted(first.values())
    order = random.Random(seed).sample(names, len(names))
    held: set[str] = set()
    while order and sum(len(topics[n]) for n in held) < eval_chars and len(held) < len(names) - 1:
        held.add(order.pop())
    return [topics[n] for n in names if n not in held], [topics[n] for n in names if n in held]


def write_python_docs(folder: Path, eval_chars: int, seed: int) -> TextFiles:
    train, held = split_topics(eval_chars, seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = TextFiles(folder / "train.txt", folder / "eval.txt")
    for path, texts in ((files.train, train), (files.eval, held)):
        with atomic_file(path) as tmp:
            tmp.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return files
