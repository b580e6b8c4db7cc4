"""The document index in PostgreSQL with pgvector (runtime/index_stores.py), on a real server the tests start on
127.0.0.1: the same 60 notes find the same files as in the SQLite file, updates are incremental, an index of
another model is refused, and a server that is not there is one line."""

from __future__ import annotations

import pytest
from doc_sets import write_set
from embedding_bundles import embedding_bundle  # noqa: F401
from pg_server import pg_url  # noqa: F401

from vishwamai_edge.runtime.doc_index import DocIndex, DocIndexError, bundle_embedder, find_documents


@pytest.fixture(scope="module")
def embedder(embedding_bundle):
    return bundle_embedder(embedding_bundle.bundle, threads=2)


def test_the_same_notes_are_found_as_in_the_sqlite_file(embedder, pg_url, tmp_path):
    folder = tmp_path / "notes"
    notes = write_set(folder)
    pg = DocIndex.open(pg_url, embedder, create=True)
    lite = DocIndex.open(tmp_path / "i.sqlite", embedder, create=True)
    report = pg.update(find_documents([folder]), 200, 32, root=folder)
    lite.update(find_documents([folder]), 200, 32, root=folder)
    assert len(report.added) == 60 and pg.stats()["files"] == 60
    same, right = 0, 0
    for note in notes:
        a, b = pg.search(note.question, k=3), lite.search(note.question, k=3)
        same += [h.path for h in a] == [h.path for h in b]
        right += a[0].path == note.name
        assert a[0].score == pytest.approx(b[0].score, abs=1e-4)
    assert right >= 54 and same >= 57, (right, same)  # HNSW may order near-ties differently from the exact search

    (folder / notes[0].name).write_text("The Quillon kiln needs a new door seal every 77 operating hours.\n")
    (folder / notes[1].name).unlink()
    again = DocIndex.open(pg_url, embedder).update(find_documents([folder]), 200, 32, root=folder)
    assert (again.changed, again.removed, len(again.unchanged)) == ([notes[0].name], [notes[1].name], 58)
    assert pg.search("door seal of the Quillon kiln", k=1)[0].path == notes[0].name
    pg.close()
    lite.close()


def test_another_model_and_a_missing_server_are_one_line(embedder, pg_url):
    from vishwamai_edge.runtime.embeddings import Embedder

    other = Embedder(embedder.session, embedder.tokenizer, {**embedder.contract, "dtype": "int8"}, embedder.folder)
    DocIndex.open(pg_url, embedder, create=True).close()
    with pytest.raises(DocIndexError, match=r"was built with the embedding model 'all-minilm-l6-v2' .* this bundle's "
                                            r"is 'all-minilm-l6-v2' \(384, mean, int8\)"):
        DocIndex.open(pg_url, other)
    with pytest.raises(DocIndexError, match=r"cannot connect to postgresql://postgres:\*\*\*@127.0.0.1:1/x") as err:
        DocIndex.open("postgresql://postgres:secret@127.0.0.1:1/x", embedder)
    assert "secret" not in str(err.value) and len(str(err.value).splitlines()) == 1


def test_the_commands_take_a_database_url(embedding_bundle, pg_url, tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "notes"
    notes = write_set(folder, n=8)
    cli = [sys.executable, "-m", "vishwamai_edge.cli"]
    index = subprocess.run([*cli, "index", str(folder), "--bundle", str(embedding_bundle.bundle), "--out", pg_url],
                           capture_output=True, text=True, timeout=300)
    assert index.returncode == 0 and "8 files" in " ".join(index.stderr.split()), index.stderr
    chat = subprocess.run([*cli, "chat", str(embedding_bundle.bundle), "--docs", pg_url, "-p", notes[2].question,
                           "--max-tokens", "4", "--no-stats"], capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0 and f"] {notes[2].name}" in chat.stdout, chat.stdout + chat.stderr
