"""`serve --docs INDEX`: a chat request with `"docs": true` is answered from the index with the default bundle
(SmolLM2-135M and all-MiniLM-L6-v2), its sources in `vishwamai_edge.sources` (which of them the reply used, when
it is whole; what was retrieved, in the first streamed chunk); wrong uses are 400s naming `docs`."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from doc_sets import write_set
from serve_process import LiveServer, start_server, stop_server


@pytest.fixture(scope="module")
def docs_server(embedded_bundle, tmp_path_factory) -> Iterator[tuple[LiveServer, list]]:
    from vishwamai_edge.runtime.doc_index import build_index

    work = tmp_path_factory.mktemp("docs-serve")
    notes = write_set(work / "notes", n=20)
    build_index([work / "notes"], embedded_bundle, work / "notes.sqlite", threads=2)
    live = start_server(embedded_bundle, work / "server.log", "--docs", str(work / "notes.sqlite"))
    yield live, notes
    stop_server(live)


def test_a_docs_request_is_answered_with_its_sources(docs_server):
    from openai import OpenAI

    live, notes = docs_server
    note = notes[4]
    with OpenAI(base_url=live.base_url, api_key="none", max_retries=0, timeout=120) as client:
        reply = client.chat.completions.create(model=live.model, max_tokens=48, extra_body={"docs": True},
                                               messages=[{"role": "user", "content": note.question}])
        chunks = list(client.chat.completions.create(model=live.model, max_tokens=8, stream=True,
                                                     extra_body={"docs": True},
                                                     messages=[{"role": "user", "content": note.question}]))
    assert str(note.hours) in reply.choices[0].message.content
    sources = reply.model_extra["vishwamai_edge"]["sources"]
    assert sources[0]["file"] == note.name and sources[0]["used"] is True and len(sources) == 3
    streamed = chunks[0].model_extra["vishwamai_edge"]["sources"]
    assert [s["file"] for s in streamed] == [s["file"] for s in sources] and "used" not in streamed[0]


@pytest.mark.parametrize("body, message", [
    ({"docs": "yes"}, "docs: true or absent"),
    ({"docs": True, "messages": [{"role": "system", "content": "Be brief."}]},
     "docs: the last user message has no text to look up"),
    ({"docs": True, "messages": [{"role": "user", "content": "why " * 300}]}, "docs: the question is 3"),
])
def test_wrong_docs_requests_are_400s(docs_server, body, message):
    live, _ = docs_server
    r = httpx.post(live.base_url + "/chat/completions", timeout=60, json={
        "model": live.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **body})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_a_server_without_an_index_says_so(server):
    r = httpx.post(server.base_url + "/chat/completions", headers=server.headers(), timeout=60, json={
        "model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "docs": True})
    assert r.status_code == 400 and "start it with serve --docs INDEX" in r.json()["error"]["message"]
