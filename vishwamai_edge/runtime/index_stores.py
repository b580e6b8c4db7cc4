"""Where a document index keeps its files, chunks and vectors (runtime/doc_index.py decides what goes in):

    SqliteStore    one SQLite file (the standard library's): vectors as float32 blobs, searched exactly in numpy
    PgVectorStore  PostgreSQL with pgvector (`postgresql://...` locations): for an index several devices or a server
                   share; cosine search in the database, an HNSW index on the vectors. psycopg is imported only here.

Both apply an update as one transaction and record the embedding model the index was built with (`meta`).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import UserError, require

# one write: (name, sha256, size, chunks (documents.Chunk), vectors float32 [chunks, dim])
Write = tuple[str, str, int, list, np.ndarray]
# one result: (score, file, text, page, heading)
Row = tuple[float, str, str, int | None, str | None]


class DocIndexError(UserError):
    """An index that cannot be opened or used as asked."""


class Store(Protocol):
    def meta(self) -> dict[str, str]: ...
    def init_meta(self, items: dict[str, str]) -> None: ...
    def files(self) -> dict[str, tuple[int, str]]: ...  # name -> (id, sha256)
    def apply(self, removed: list[int], writes: list[Write]) -> None: ...
    def search(self, q: np.ndarray, k: int) -> list[Row]: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def is_database_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def open_store(location: str, create: bool, dim: int) -> Store:
    if is_database_url(location):
        return PgVectorStore.open(location, create, dim)
    return SqliteStore.open(Path(location), create)


# -- one SQLite file -----------------------------------------------------------------------------
_SQLITE_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, sha256 TEXT NOT NULL,
                                  size INTEGER NOT NULL, chunks INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files(id),
                                   text TEXT NOT NULL, page INTEGER, heading TEXT, start INTEGER, end_ INTEGER,
                                   vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_file ON chunks(file_id);
"""


class SqliteStore:
    def __init__(self, path: Path, db: sqlite3.Connection) -> None:
        self.path, self.db = path, db
        self._ids: np.ndarray | None = None
        self._matrix: np.ndarray | None = None

    @classmethod
    def open(cls, path: Path, create: bool) -> SqliteStore:
        if not create and not path.is_file():
            raise DocIndexError(f"{path}: no such index; build one with `vishwamai-edge index DOCS --bundle B --out "
                             f"{path}`")
        try:
            # a server's worker threads share it, one at a time under the index's lock
            db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            if create:
                db.executescript(_SQLITE_TABLES)
            db.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.DatabaseError:
            raise DocIndexError(f"{path} is not a document index (not an SQLite file this tool wrote)") from None
        return cls(path, db)

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def init_meta(self, items: dict[str, str]) -> None:
        with self.db:
            self.db.executemany("INSERT INTO meta VALUES (?, ?)", list(items.items()))

    def files(self) -> dict[str, tuple[int, str]]:
        return {p: (i, h) for i, p, h in self.db.execute("SELECT id, path, sha256 FROM files")}

    def apply(self, removed: list[int], writes: list[Write]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            for file_id in removed:
                self.db.execute("DELETE FROM chunks WHERE file_id = ?", (file_id,))
                self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))
            for name, digest, size, chunks, vectors in writes:
                cur = self.db.execute("INSERT INTO files (path, sha256, size, chunks) VALUES (?, ?, ?, ?)",
                                      (name, digest, size, len(chunks)))
                self.db.executemany(
                    "INSERT INTO chunks (file_id, text, page, heading, start, end_, vector) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(cur.lastrowid, c.text, c.page, c.heading, c.start, c.end, v.astype("<f4").tobytes())
                     for c, v in zip(chunks, vectors)])
        self._matrix = None

    def _load(self) -> None:
        rows = self.db.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
        self._ids = np.array([r[0] for r in rows], dtype=np.int64)
        self._matrix = (np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1)
                        if rows else np.zeros((0, 1), dtype=np.float32))

    def search(self, q: np.ndarray, k: int) -> list[Row]:
        if self._matrix is None:
            self._load()
        assert self._matrix is not None and self._ids is not None
        if not len(self._ids):
            return []
        scores = self._matrix @ q
        out = []
        for i in np.argsort(-scores)[:k]:
            text, page, heading, path = self.db.execute(
                "SELECT c.text, c.page, c.heading, f.path FROM chunks c JOIN files f ON f.id = c.file_id "
                "WHERE c.id = ?", (int(self._ids[i]),)).fetchone()
            out.append((float(scores[i]), path, text, page, heading))
        return out

    def stats(self) -> dict[str, Any]:
        files, chunks = self.db.execute("SELECT (SELECT COUNT(*) FROM files), (SELECT COUNT(*) FROM chunks)").fetchone()
        return {"files": files, "chunks": chunks, "bytes": self.path.stat().st_size}

    def close(self) -> None:
        self.db.close()


# -- PostgreSQL with pgvector ----------------------------------------------------------------------
def _pg_tables(dim: int) -> list[str]:
    return [
        "CREATE EXTENSION IF NOT EXISTS vector",
        "CREATE TABLE IF NOT EXISTS vedge_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS vedge_files (id SERIAL PRIMARY KEY, path TEXT UNIQUE NOT NULL, "
        "sha256 TEXT NOT NULL, size BIGINT NOT NULL, chunks INTEGER NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS vedge_chunks (id SERIAL PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES "
        f"vedge_files(id) ON DELETE CASCADE, text TEXT NOT NULL, page INTEGER, heading TEXT, start_ INTEGER, "
        f"end_ INTEGER, embedding vector({int(dim)}) NOT NULL)",
        "CREATE INDEX IF NOT EXISTS vedge_chunks_hnsw ON vedge_chunks USING hnsw (embedding vector_cosine_ops)",
    ]


def _vector(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in v.tolist()) + "]"


class PgVectorStore:
    def __init__(self, url: str, conn: Any) -> None:
        self.url, self.conn = url, conn

    @classmethod
    def open(cls, url: str, create: bool, dim: int) -> PgVectorStore:
        psycopg = require("psycopg", "docs-server")
        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise DocIndexError(f"cannot connect to {_safe(url)}: {str(exc).strip().splitlines()[0]}") from None
        try:
            if create:
                with conn.transaction():
                    for statement in _pg_tables(dim):
                        conn.execute(statement)
            conn.execute("SELECT key, value FROM vedge_meta").fetchall()
        except psycopg.Error as exc:
            conn.close()
            if not create and "vedge_meta" in str(exc):
                raise DocIndexError(f"{_safe(url)} holds no document index; build one with `vishwamai-edge index DOCS "
                                 f"--bundle B --out {_safe(url)}`") from None
            raise DocIndexError(f"{_safe(url)}: {str(exc).strip().splitlines()[0]}") from None
        return cls(url, conn)

    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM vedge_meta").fetchall())

    def init_meta(self, items: dict[str, str]) -> None:
        with self.conn.transaction():
            for key, value in items.items():
                self.conn.execute("INSERT INTO vedge_meta VALUES (%s, %s) ON CONFLICT (key) DO NOTHING", (key, value))

    def files(self) -> dict[str, tuple[int, str]]:
        return {p: (i, h) for i, p, h in self.conn.execute("SELECT id, path, sha256 FROM vedge_files")}

    def apply(self, removed: list[int], writes: list[Write]) -> None:
        with self.conn.transaction():
            if removed:
                self.conn.execute("DELETE FROM vedge_files WHERE id = ANY(%s)", (removed,))  # chunks cascade
            for name, digest, size, chunks, vectors in writes:
                (file_id,) = self.conn.execute(
                    "INSERT INTO vedge_files (path, sha256, size, chunks) VALUES (%s, %s, %s, %s) RETURNING id",
                    (name, digest, size, len(chunks))).fetchone()
                with self.conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO vedge_chunks (file_id, text, page, heading, start_, end_, embedding) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s::vector)",
                        [(file_id, c.text, c.page, c.heading, c.start, c.end, _vector(v))
                         for c, v in zip(chunks, vectors)])

    def search(self, q: np.ndarray, k: int) -> list[Row]:
        v = _vector(q)
        rows = self.conn.execute(
            "SELECT 1 - (c.embedding <=> %s::vector), f.path, c.text, c.page, c.heading FROM vedge_chunks c "
            "JOIN vedge_files f ON f.id = c.file_id ORDER BY c.embedding <=> %s::vector LIMIT %s",
            (v, v, k)).fetchall()
        return [(float(s), p, t, pg, h) for s, p, t, pg, h in rows]

    def stats(self) -> dict[str, Any]:
        files, chunks = self.conn.execute(
            "SELECT (SELECT COUNT(*) FROM vedge_files), (SELECT COUNT(*) FROM vedge_chunks)").fetchone()
        return {"files": files, "chunks": chunks, "bytes": None}

    def close(self) -> None:
        self.conn.close()


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
