"""`ui --docs INDEX` in Debian's Chromium: a typed question is answered from the document index by the default
bundle, and the sources the reply used are shown under it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from doc_sets import write_set

WAIT_MS = 120_000


@pytest.fixture(scope="module")
def docs_ui(ui_engine, tmp_path_factory, embedded_bundle) -> Iterator[tuple[str, list]]:
    from in_thread_server import launched_ui

    from vishwamai_edge.runtime.doc_index import build_index
    from vishwamai_edge.runtime.retrieval import Retrieval

    work = tmp_path_factory.mktemp("docs-ui")
    notes = write_set(work / "notes", n=20)
    build_index([work / "notes"], embedded_bundle, work / "notes.sqlite", threads=1)
    retrieval = Retrieval.open(work / "notes.sqlite", ui_engine.pipeline)
    with launched_ui(ui_engine, 1, retrieval) as url:
        yield url, notes
    retrieval.close()


def test_the_answer_shows_its_source(browser, docs_ui):
    url, notes = docs_ui
    note = notes[4]
    page = browser.new_page()
    try:
        page.goto(url, wait_until="networkidle")
        page.wait_for_selector("#prompt textarea")
        page.fill("#prompt textarea", note.question)
        page.click("#send")
        page.wait_for_function(
            "f => [...document.querySelectorAll('#chat .bot-row')].some(e => e.innerText.includes(f))",
            arg=f"] {note.name}", timeout=WAIT_MS)
        answer = page.locator("#chat .bot-row").last.inner_text()
    finally:
        page.close()
    assert str(note.hours) in answer and "Sources" in answer, answer
