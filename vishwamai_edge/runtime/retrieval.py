"""Answers from local documents: the chunks of the index nearest a question go into the system turn, numbered, the
question is the user's turn, and the model is asked to cite the sources by number. The sources a reply used are
listed after it (file, page or heading): the ones it cited, or, when it cites none, the ones holding its words (a
model of SmolLM2-135M's size answers from the sources but seldom cites them; measured in tests/README.md).
Every front end goes through `Retrieval`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BundleError
from .doc_index import DocIndex, Hit

INSTRUCTION = "Answer the user's question from these sources. Cite the source number in brackets, like [1]."
_CITATION = re.compile(r"\[(\d{1,2})\]")
_WORD = re.compile(r"\w+")
MATCH = 0.5  # the share of a reply's words (numbers, and words of 4 letters or more) a source must hold


@dataclass
class Retrieval:
    index: DocIndex
    k: int = 3

    @classmethod
    def open(cls, path: Path | str, pipeline: Any, k: int = 3) -> Retrieval:
        embedder = pipeline.encoders.get("embedding")
        if embedder is None:
            raise BundleError(f"bundle {pipeline.bundle.root} has no embedding model to read the index with; "
                              "build it from a recipe with an embeddings section")
        return cls(DocIndex.open(str(path), embedder), k)

    def ask(self, question: str, system: str | None = None) -> tuple[str, list[Hit]]:
        """The system turn (`system`, then the sources for `question`) and those chunks, best first."""
        hits = self.index.search(question, self.k)
        return grounded(hits, system), hits

    def close(self) -> None:
        self.index.close()


def grounded(hits: list[Hit], system: str | None = None) -> str:
    sources = "\n\n".join(f"[{i}] {h.text}" for i, h in enumerate(hits, 1))
    return (f"{system}\n\n" if system else "") + f"{INSTRUCTION}\n\n{sources}"


def cited(reply: str, hits: list[Hit]) -> list[tuple[int, Hit]]:
    """The sources the reply cites, by number, in order of first citation (numbers it invented are ignored)."""
    seen: dict[int, Hit] = {}
    for m in _CITATION.finditer(reply):
        n = int(m.group(1))
        if 1 <= n <= len(hits) and n not in seen:
            seen[n] = hits[n - 1]
    return list(seen.items())


def matched(reply: str, hits: list[Hit]) -> list[tuple[int, Hit]]:
    """The sources that hold the reply's numbers (the strongest sign of an extractive answer's origin), else the
    ones that hold most of its words (numbers and longer words), best first."""
    words = {w for w in _WORD.findall(reply.lower()) if w.isdigit() or len(w) >= 4}
    if not words:
        return []
    held = [set(_WORD.findall(h.text.lower())) for h in hits]
    numbers = {w for w in words if w.isdigit()}
    with_numbers = [(i, hits[i - 1]) for i, w in enumerate(held, 1) if numbers & w]
    if with_numbers:
        return with_numbers
    shares = [(len(words & w) / len(words), i) for i, w in enumerate(held, 1)]
    best = max(s for s, _ in shares)
    return [(i, hits[i - 1]) for s, i in sorted(shares, reverse=True) if s >= MATCH and s >= 0.9 * best]


def used_sources(reply: str, hits: list[Hit]) -> tuple[str, list[tuple[int, Hit]]]:
    """("cited" or "matched", the sources): what the reply cited, else what holds its words."""
    used = cited(reply, hits)
    return ("cited", used) if used else ("matched", matched(reply, hits))


def sources_lines(reply: str, hits: list[Hit]) -> list[str]:
    """What is shown under a reply: the sources it used, or the retrieved ones when none can be told."""
    how, used = used_sources(reply, hits)
    if used:
        head = "Sources:" if how == "cited" else "Sources (holding the reply's words):"
        return [head] + [f"  [{n}] {h.where()}" for n, h in used]
    return ["Retrieved (the reply used none of them):"] + [f"  [{i}] {h.where()}" for i, h in enumerate(hits, 1)]
