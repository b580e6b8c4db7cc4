"""POST /v1/embeddings on a real `serve` process: a bundle with the shipped all-MiniLM-L6-v2 beside a tiny LLM
answers the openai client with sentence-transformers' vectors (floats and base64), and every malformed request is
a 4xx that names its field while the server goes on; a bundle without an embedding model says so."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from embedding_bundles import embedding_bundle  # noqa: F401
from serve_process import LiveServer, start_server, stop_server

TEXTS = ["How often is the coolant filter replaced?", "Every 500 operating hours.", "unrelated: the moon"]


@pytest.fixture(scope="module")
def live(embedding_bundle, tmp_path_factory) -> Iterator[LiveServer]:
    server = start_server(embedding_bundle.bundle, tmp_path_factory.mktemp("serve-emb") / "server.log")
    yield server
    stop_server(server)


def test_the_manifest_records_the_model_and_its_check(embedding_bundle):
    entry = embedding_bundle.manifest["encoders"]["embedding"]
    assert entry["kind"] == "sentence-embedding" and entry["dim"] == 384 and entry["pooling"] == "mean"
    assert entry["source"] == {"name": "all-minilm-l6-v2", "license": "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)"}
    assert entry["check"]["min_cosine"] >= 0.9999 and entry["check"]["max_abs_diff"] < 1e-4
    assert embedding_bundle.manifest["checks"]["embedding"] == entry["check"]
    assert set(entry["files"].values()) <= set(embedding_bundle.manifest["files"])


def test_the_openai_client_gets_sentence_transformers_vectors(live):
    from openai import OpenAI
    from sentence_transformers import SentenceTransformer

    from vishwamai_edge.sources.embedded import embedded_sentence_embedder

    want = SentenceTransformer(str(embedded_sentence_embedder()), device="cpu", local_files_only=True).encode(TEXTS)
    with OpenAI(base_url=live.base_url, api_key="none", max_retries=0, timeout=60) as client:
        got = client.embeddings.create(model=live.model, input=TEXTS, encoding_format="float")
        one = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS[0])
    vectors = np.array([d.embedding for d in got.data])
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == "all-minilm-l6-v2"
    assert np.abs(vectors - want).max() < 1e-5
    assert got.usage.prompt_tokens == got.usage.total_tokens > 15
    assert np.allclose(one.data[0].embedding, vectors[0], atol=1e-6)
    raw = httpx.post(live.base_url + "/embeddings", json={"model": live.model, "input": TEXTS,
                                                           "encoding_format": "base64"}, timeout=60).json()
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
    assert np.array_equal(decoded, vectors.astype(np.float32))


@pytest.mark.parametrize("body, status, message", [
    ({"input": "hi"}, 400, "model: Field required"),
    ({"model": "M", "input": [[101, 2023]]}, 400, "input: a string or a list of strings"),
    ({"model": "M", "input": ""}, 400, "input: an empty text has no embedding"),
    ({"model": "M", "input": []}, 400, "input: 1 to 2048 texts"),
    ({"model": "M", "input": "hi", "dimensions": 64}, 400, "dimensions is not supported"),
    ({"model": "M", "input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "M", "input": "word " * 400}, 400, "tokens long; the embedding model reads at most 256"),
    # one request may not keep the model for long: 200 texts of 252 tokens are over the 32,768 a request takes
    ({"model": "M", "input": ["word " * 250] * 200}, 400, "holds 50400 tokens together; one request takes at most 32768"),
    ({"model": "gpt-4", "input": "hi"}, 404, "the model 'gpt-4' does not exist here"),
    ("[1, 2", 400, "the request body is not valid JSON"),
])
def test_malformed_requests_are_4xx_and_the_server_goes_on(live, body, status, message):
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": live.model}
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.post(live.base_url + "/embeddings", timeout=60, **kwargs)
    assert r.status_code == status and message in r.json()["error"]["message"], r.text
    ok = httpx.post(live.base_url + "/embeddings", json={"model": live.model, "input": "still here"}, timeout=60)
    assert ok.status_code == 200


def test_a_bundle_without_an_embedding_model_says_so(vlm_server):
    r = httpx.post(vlm_server.base_url + "/embeddings", json={"model": vlm_server.model, "input": "hi"}, timeout=60)
    assert r.status_code == 400 and "this bundle has no embedding model" in r.json()["error"]["message"]
