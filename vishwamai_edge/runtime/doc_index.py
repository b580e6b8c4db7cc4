"""A document index: local documents read (runtime/documents.py), cut into chunks of the embedding tokenizer's
tokens, embedded by the bundle's model, and kept with their file's hash and their positions in a store
(runtime/index_stores.py): one SQLite file on the device, searched exactly in numpy, or PostgreSQL with pgvector
for an index several devices share.

Why not sqlite-vec: it is a SQLite extension, and Python builds without extension loading (this project's CI
Python among them) cannot load it. Why not an approximate index on the device (usearch, faiss): at the sizes one
device holds (10,000 chunks: 15 MB of vectors) the exact search takes milliseconds; benchmarks/doc_index.py
measures both.

Updates are incremental (a file whose bytes changed is re-embedded, an unchanged one is not, a deleted one leaves)
and atomic: every change of one `update` is one transaction of the store, so an interrupted run leaves the index as
it was. The index records the embedding model it was built with; a bundle with another model is refused.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .documents import SUFFIXES, UnreadableDocument, chunk_sections, read_document
from .index_stores import DocIndexError, is_database_url, open_store

SCHEMA = 1


@dataclass
class Hit:
    score: float
    path: str
    text: str
    page: int | None
    heading: str | None

    def where(self) -> str:
        """file, page or heading: how a reply cites it."""
        return self.path + (f", page {self.page}" if self.page else "") + (f", \u201c{self.heading}\u201d"
                                                                          if self.heading else "")


@dataclass
class UpdateReport:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line each: the file and why
    chunks: int = 0  # embedded in this run
    seconds: float = 0.0


def model_identity(embedder: Any) -> dict[str, str]:
    """What must match between an index and the model that queries it."""
    c = embedder.contract
    return {"model": str((c.get("source") or {}).get("name", "")), "dim": str(c["dim"]),
            "pooling": str(c["pooling"]), "normalize": str(bool(c["normalize"])), "dtype": str(c.get("dtype", ""))}


def find_documents(inputs: Iterable[Path]) -> list[Path]:
    """The documents under the given files and folders (recursively), in a stable order."""
    out: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    if not out:
        raise InputError(f"no documents ({', '.join(SUFFIXES)}) under {', '.join(map(str, inputs))}")
    return list(dict.fromkeys(f.resolve() for f in out))


class DocIndex:
    """Documents -> chunks -> vectors in a store: the SQLite file (one device) or PostgreSQL with pgvector (several
    devices or a server; `postgresql://` locations, runtime/index_stores.py)."""

    def __init__(self, location: str, store: Any, embedder: Any) -> None:
        self.location, self.store, self.embedder = location, store, embedder
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return Path(self.location)

    @classmethod
    def open(cls, location: Path | str, embedder: Any, create: bool = False) -> DocIndex:
        location = str(location)
        store = open_store(location, create, embedder.dim)
        want = model_identity(embedder)
        meta = store.meta()
        if meta:
            have = {k: meta.get(k, "") for k in want}
            if have != want:
                store.close()
                raise DocIndexError(f"{location} was built with the embedding model {have['model']!r} ({have['dim']} "
                                    f"dimensions, {have['pooling']} pooling, {have['dtype']}); this bundle's is "
                                    f"{want['model']!r} ({want['dim']}, {want['pooling']}, {want['dtype']}): rebuild "
                                    "the index with this bundle")
        elif create:
            store.init_meta({**want, "schema": str(SCHEMA)})
        else:
            store.close()
            raise DocIndexError(f"{location} is not a document index (it has no model record)")
        return cls(location, store, embedder)

    def close(self) -> None:
        self.store.close()

    # -- building ------------------------------------------------------------------------------
    def update(self, documents: list[Path], chunk_tokens: int, overlap: int,
               progress: Callable[[int, int], None] | None = None, root: Path | None = None) -> UpdateReport:
        """Bring the index in line with `documents`: new and changed files (re)embedded, unchanged ones kept, files
        no longer among them removed. All of it in one transaction."""
        t0 = time.perf_counter()
        report = UpdateReport()
        known = self.store.files()
        names = {doc: _name(doc, root) for doc in documents}
        todo: list[tuple[Path, str, list]] = []
        for doc in documents:
            digest = hashlib.sha256(doc.read_bytes()).hexdigest()
            name = names[doc]
            if name in known and known[name][1] == digest:
                report.unchanged.append(name)
                continue
            try:
                chunks = chunk_sections(read_document(doc), self.embedder.tokenizer, chunk_tokens, overlap)
            except UnreadableDocument as exc:
                report.skipped.append(str(exc))
                continue
            if not chunks:
                report.skipped.append(f"{doc}: no text in it")
                continue
            todo.append((doc, digest, chunks))
        total = sum(len(c) for _, _, c in todo)
        done = 0
        writes: list[tuple[str, str, int, list, np.ndarray]] = []
        for doc, digest, chunks in todo:  # embed everything before touching the index
            vectors = []
            for i in range(0, len(chunks), 64):
                batch = chunks[i:i + 64]
                vectors.append(self.embedder.embed([c.text for c in batch], what=f"chunk of {doc}"))
                done += len(batch)
                if progress is not None:
                    progress(done, total)
            writes.append((names[doc], digest, doc.stat().st_size, chunks, np.concatenate(vectors)))
            (report.changed if names[doc] in known else report.added).append(names[doc])
        gone = [n for n in known if n not in set(names.values())]
        report.removed = gone
        replaced = [known[n][0] for n in gone] + [known[w[0]][0] for w in writes if w[0] in known]
        with self._lock:
            self.store.apply(replaced, writes)  # one transaction: an interruption leaves the index as it was
        report.chunks = total
        report.seconds = time.perf_counter() - t0
        return report

    # -- searching -----------------------------------------------------------------------------
    def search(self, question: str, k: int = 4) -> list[Hit]:
        """The `k` chunks nearest the question (cosine), best first."""
        q = self.embedder.embed([question], what="question")[0]
        with self._lock:
            return [Hit(score, path, text, page, heading) for score, path, text, page, heading in self.store.search(q, k)]

    def stats(self) -> dict[str, Any]:
        return {**self.store.stats(), **self.store.meta()}


def _name(doc: Path, root: Path | None) -> str:
    """How the index names a file: relative to `root` when it is inside it, else its absolute path."""
    if root is not None:
        try:
            return str(doc.relative_to(root))
        except ValueError:
            pass
    return str(doc)


def bundle_embedder(bundle_dir: Path, threads: int | None = None) -> Any:
    """The embedding model of a bundle, alone (no LLM loaded); a bundle without one is a one-line error."""
    from .bundle import Bundle
    from .embeddings import Embedder

    bundle = Bundle.load(Path(bundle_dir))
    entry = bundle.manifest.encoders.get("embedding")
    if entry is None:
        raise DocIndexError(f"bundle {bundle_dir} has no embedding model; build it from a recipe with an embeddings "
                            "section (embeddings: {kind: embedded})")
    return Embedder.from_manifest(bundle, entry.model_dump(mode="json"), threads=threads)


def build_index(inputs: list[Path], bundle_dir: Path, out: Path | str, chunk_tokens: int | None = None, overlap: int = 32,
                threads: int | None = None, console: Any = None) -> UpdateReport:
    """`vishwamai-edge index`: the documents under `inputs` embedded into `out` (created, or brought up to date)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    documents = find_documents(inputs)  # an empty folder fails before any model loads
    embedder = bundle_embedder(bundle_dir, threads)
    room = embedder.max_tokens - 2  # the model's window less its [CLS] and [SEP]
    size = chunk_tokens or min(room - 16, 240)  # a margin: a chunk re-tokenized alone may gain a token or two
    if not 0 < size <= room:
        raise InputError(f"--chunk-tokens {size}: the embedding model reads {room} tokens of text at most")
    if not 0 <= overlap < size:
        raise InputError(f"--overlap {overlap}: must be below the chunk size ({size} tokens)")
    roots = [Path(p).resolve() for p in inputs if Path(p).is_dir()]
    existed = is_database_url(str(out)) or Path(out).exists()
    index = DocIndex.open(out, embedder, create=True)
    try:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("embedding chunks", total=None)
            report = index.update(documents, size, overlap, lambda done, total: bar.update(task, completed=done,
                                                                                          total=total),
                                  root=roots[0] if len(roots) == 1 else None)
        stats = index.stats()
    except BaseException:
        index.close()
        if not existed:  # a new index that a failure or Ctrl-C cut short is not left behind
            Path(out).unlink(missing_ok=True)
        raise
    index.close()
    for line in report.skipped:
        console.print(f"[yellow]skipped[/] {line}")
    console.print(f"[green]✓[/] {out}: {stats['files']} files, {stats['chunks']} chunks "
                  f"({len(report.added)} added, {len(report.changed)} changed, {len(report.unchanged)} unchanged, "
                  f"{len(report.removed)} removed; {report.chunks} chunks embedded in {report.seconds:.1f} s)")
    if not stats["files"]:
        if not existed:
            Path(out).unlink(missing_ok=True)
        raise InputError("no document could be read, so no index was written (see the skipped files above)")
    return report
