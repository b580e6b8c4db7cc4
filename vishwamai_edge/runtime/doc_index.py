"""A document index on the device: one SQLite file (the standard library's, no extension) holding each file's
hash, its chunks with their positions, and each chunk's vector from the bundle's embedding model; searched
exactly (an inner product over all vectors, which are unit length: cosine) with numpy.

Why not sqlite-vec: it is a SQLite extension, and Python builds without extension loading (this project's CI
Python among them) cannot load it. Why not an approximate index (usearch, faiss): at the sizes one device holds
(10,000 chunks: 15 MB of vectors) the exact search takes milliseconds; benchmarks/doc_index.py measures both.

Updates are incremental (a file whose bytes changed is re-embedded, an unchanged one is not, a deleted one leaves)
and atomic: every change of one `update` is one SQLite transaction, so an interrupted run leaves the index as it
was. The index records the embedding model it was built with; a bundle with another model is refused.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UserError
from .documents import SUFFIXES, UnreadableDocument, chunk_sections, read_document

SCHEMA = 1
_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, sha256 TEXT NOT NULL,
                                  size INTEGER NOT NULL, chunks INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files(id),
                                   text TEXT NOT NULL, page INTEGER, heading TEXT, start INTEGER, end_ INTEGER,
                                   vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_file ON chunks(file_id);
"""


class DocIndexError(UserError):
    """An index that cannot be opened or used as asked."""


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
    def __init__(self, path: Path, db: sqlite3.Connection, embedder: Any) -> None:
        self.path, self.db, self.embedder = path, db, embedder
        self._lock = threading.Lock()
        self._matrix: np.ndarray | None = None
        self._ids: np.ndarray | None = None

    @classmethod
    def open(cls, path: Path, embedder: Any, create: bool = False) -> DocIndex:
        path = Path(path)
        if not create and not path.is_file():
            raise DocIndexError(f"{path}: no such index; build one with `vishwamai-edge index DOCS --bundle B --out "
                              f"{path}`")
        try:
            # a server's worker threads share it: one at a time, under the index's lock
            db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            if create:
                db.executescript(_TABLES)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError:
            raise DocIndexError(f"{path} is not a document index (not an SQLite file this tool wrote)") from None
        want = model_identity(embedder)
        if meta:
            have = {k: meta.get(k, "") for k in want}
            if have != want:
                db.close()
                raise DocIndexError(f"{path} was built with the embedding model {have['model']!r} ({have['dim']} "
                                  f"dimensions, {have['pooling']} pooling, {have['dtype']}); this bundle's is "
                                  f"{want['model']!r} ({want['dim']}, {want['pooling']}, {want['dtype']}): rebuild "
                                  "the index with this bundle")
        elif create:
            with db:
                db.executemany("INSERT INTO meta VALUES (?, ?)", [*want.items(), ("schema", str(SCHEMA))])
        else:
            raise DocIndexError(f"{path} is not a document index (it has no model record)")
        return cls(path, db, embedder)

    def close(self) -> None:
        self.db.close()

    # -- building ------------------------------------------------------------------------------
    def update(self, documents: list[Path], chunk_tokens: int, overlap: int,
               progress: Callable[[int, int], None] | None = None, root: Path | None = None) -> UpdateReport:
        """Bring the index in line with `documents`: new and changed files (re)embedded, unchanged ones kept, files
        no longer among them removed. All of it in one transaction."""
        t0 = time.perf_counter()
        report = UpdateReport()
        known = {p: (i, h) for i, p, h in self.db.execute("SELECT id, path, sha256 FROM files")}
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
        embedded: list[tuple[Path, str, list, np.ndarray]] = []
        for doc, digest, chunks in todo:  # embed everything before touching the index
            vectors = []
            for i in range(0, len(chunks), 64):
                batch = chunks[i:i + 64]
                vectors.append(self.embedder.embed([c.text for c in batch], what=f"chunk of {doc}"))
                done += len(batch)
                if progress is not None:
                    progress(done, total)
            embedded.append((doc, digest, chunks, np.concatenate(vectors)))
        gone = [n for n in known if n not in set(names.values())]
        with self.db:  # one transaction: an interruption leaves the index as it was
            self.db.execute("BEGIN")
            for name in gone:
                self._drop(known[name][0])
                report.removed.append(name)
            for doc, digest, chunks, vectors in embedded:
                name = names[doc]
                if name in known:
                    self._drop(known[name][0])
                    report.changed.append(name)
                else:
                    report.added.append(name)
                cur = self.db.execute("INSERT INTO files (path, sha256, size, chunks) VALUES (?, ?, ?, ?)",
                                      (name, digest, doc.stat().st_size, len(chunks)))
                self.db.executemany(
                    "INSERT INTO chunks (file_id, text, page, heading, start, end_, vector) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(cur.lastrowid, c.text, c.page, c.heading, c.start, c.end, v.astype("<f4").tobytes())
                     for c, v in zip(chunks, vectors)])
        report.chunks = total
        report.seconds = time.perf_counter() - t0
        self._matrix = None
        return report

    def _drop(self, file_id: int) -> None:
        self.db.execute("DELETE FROM chunks WHERE file_id = ?", (file_id,))
        self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    # -- searching -----------------------------------------------------------------------------
    def _load(self) -> None:
        rows = self.db.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
        dim = self.embedder.dim
        self._ids = np.array([r[0] for r in rows], dtype=np.int64)
        self._matrix = (np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)
                        if rows else np.zeros((0, dim), dtype=np.float32))

    def search(self, question: str, k: int = 4) -> list[Hit]:
        """The `k` chunks nearest the question (cosine), best first."""
        q = self.embedder.embed([question], what="question")[0]
        with self._lock:
            if self._matrix is None:
                self._load()
            assert self._matrix is not None and self._ids is not None
            scores = self._matrix @ q
            top = np.argsort(-scores)[:k]
            out = []
            for i in top:
                text, page, heading, path = self.db.execute(
                    "SELECT c.text, c.page, c.heading, f.path FROM chunks c JOIN files f ON f.id = c.file_id "
                    "WHERE c.id = ?", (int(self._ids[i]),)).fetchone()
                out.append(Hit(float(scores[i]), path, text, page, heading))
        return out

    def stats(self) -> dict[str, Any]:
        files, chunks = self.db.execute("SELECT (SELECT COUNT(*) FROM files), (SELECT COUNT(*) FROM chunks)").fetchone()
        return {"files": files, "chunks": chunks, "bytes": self.path.stat().st_size,
                **dict(self.db.execute("SELECT key, value FROM meta").fetchall())}


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


def build_index(inputs: list[Path], bundle_dir: Path, out: Path, chunk_tokens: int | None = None, overlap: int = 32,
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
    existed = Path(out).exists()
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
