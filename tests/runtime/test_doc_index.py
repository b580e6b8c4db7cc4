"""The document index (runtime/documents.py, runtime/doc_index.py) with the shipped all-MiniLM-L6-v2: 60
generated notes in four formats, questions answered by the right file at rank 1 and within the first 5,
incremental updates, atomic ones, and the files and indexes it refuses."""

from __future__ import annotations

import shutil
import sqlite3

import pytest
from doc_sets import body, write_pdf, write_set
from embedding_bundles import embedding_bundle, minilm_export  # noqa: F401

from vishwamai_edge.errors import InputError
from vishwamai_edge.runtime.doc_index import DocIndex, DocIndexError, bundle_embedder, find_documents
from vishwamai_edge.runtime.documents import read_document


@pytest.fixture(scope="module")
def embedder(embedding_bundle):
    return bundle_embedder(embedding_bundle.bundle, threads=2)


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    return folder, write_set(folder)


@pytest.fixture(scope="module")
def built(embedder, docs, tmp_path_factory):
    folder, _ = docs
    path = tmp_path_factory.mktemp("index") / "docs.sqlite"
    index = DocIndex.open(path, embedder, create=True)
    report = index.update(find_documents([folder]), 200, 32, root=folder)
    return index, report


def test_every_format_is_read_with_its_positions(docs):
    folder, notes = docs
    md = read_document(folder / notes[1].name)
    assert [s.heading for s in md] == [notes[1].machine, "Service"] and body(notes[1]) in md[1].text
    html = read_document(folder / notes[2].name)
    assert html[-1].heading == notes[2].machine and "secret" not in " ".join(s.text for s in html)
    pdf = read_document(folder / notes[3].name)
    assert [s.page for s in pdf] == [1, 2] and f"every {notes[3].hours} operating hours" in pdf[1].text


def test_questions_find_their_note(built, docs):
    index, report = built
    _, notes = docs
    assert len(report.added) == 60 and not report.skipped
    ranks = []
    for note in notes:
        hits = index.search(note.question, k=5)
        files = [h.path for h in hits]
        ranks.append(files.index(note.name) + 1 if note.name in files else None)
    at1 = sum(r == 1 for r in ranks) / len(ranks)
    at5 = sum(r is not None for r in ranks) / len(ranks)
    print(f"recall@1 {at1:.3f}, recall@5 {at5:.3f}")
    assert at1 >= 0.9 and at5 >= 0.98, ranks
    pdf_note = notes[3]
    best = index.search(pdf_note.question, k=1)[0]
    assert best.page == 2 and best.where() == f"{pdf_note.name}, page 2"


def test_updates_are_incremental_and_atomic(embedder, docs, tmp_path):
    src, notes = docs
    folder = tmp_path / "docs"
    shutil.copytree(src, folder)
    path = tmp_path / "i.sqlite"
    DocIndex.open(path, embedder, create=True).update(find_documents([folder]), 200, 32, root=folder)
    (folder / notes[0].name).write_text("The Quillon kiln needs a new door seal every 77 operating hours.\n")
    (folder / notes[4].name).unlink()
    index = DocIndex.open(path, embedder)

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        index.update(find_documents([folder]), 200, 32, progress=interrupt, root=folder)
    assert index.stats()["files"] == 60  # nothing of the interrupted run is in it
    report = index.update(find_documents([folder]), 200, 32, root=folder)
    assert (report.changed, report.removed, len(report.unchanged), report.chunks) == \
           ([notes[0].name], [notes[4].name], 58, 1)
    assert index.search("door seal of the Quillon kiln", k=1)[0].path == notes[0].name
    assert index.stats()["files"] == 59


def test_unreadable_files_are_skipped_with_a_warning(embedder, tmp_path):
    from pypdf import PdfWriter

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "fine.txt").write_text("The pump runs quietly.")
    (folder / "binary.txt").write_bytes(b"\x00\x01\x02ELF" * 100)
    (folder / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\nnot really")
    writer = PdfWriter()
    writer.add_blank_page(200, 200)
    writer.encrypt("secret")
    with open(folder / "locked.pdf", "wb") as f:
        writer.write(f)
    write_pdf(folder / "empty.pdf", [" "])
    report = DocIndex.open(tmp_path / "i.sqlite", embedder, create=True).update(find_documents([folder]), 200, 32)
    assert report.added == [str((folder / "fine.txt").resolve())]
    reasons = " | ".join(report.skipped)
    for expected in ("binary.txt: a binary file, not text", "latin1.md: not UTF-8 text (byte 3)",
                     "broken.pdf: not a readable PDF", "locked.pdf: an encrypted PDF", "empty.pdf: no text in it"):
        assert expected in reasons, reasons


def test_an_index_of_another_model_or_no_index_is_refused(embedder, built, tmp_path, minilm_int8):
    index, _ = built
    with pytest.raises(DocIndexError, match=r"was built with the embedding model 'all-minilm-l6-v2' \(384 dimensions, "
                                            r"mean pooling, fp32\); this bundle's is '' \(384, mean, int8\)"):
        DocIndex.open(index.path, minilm_int8)
    (tmp_path / "not.sqlite").write_text("hello")
    with pytest.raises(DocIndexError, match="is not a document index"):
        DocIndex.open(tmp_path / "not.sqlite", embedder)
    with pytest.raises(DocIndexError, match="no such index"):
        DocIndex.open(tmp_path / "absent.sqlite", embedder)
    empty = sqlite3.connect(tmp_path / "other.sqlite")
    empty.execute("CREATE TABLE t (x)")
    empty.close()
    with pytest.raises(DocIndexError, match="other.sqlite is not a document index"):
        DocIndex.open(tmp_path / "other.sqlite", embedder)
    with pytest.raises(InputError, match="the question is 3\\d\\d tokens long"):
        index.search("why " * 300)
    with pytest.raises(InputError, match="no documents"):
        (tmp_path / "nothing").mkdir()
        find_documents([tmp_path / "nothing"])


@pytest.fixture(scope="module")
def minilm_int8(minilm_export):
    from vishwamai_edge.runtime.embeddings import Embedder

    return Embedder.load(minilm_export("int8")[0])
