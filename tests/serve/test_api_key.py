"""`serve --ui --api-key K`: no route of the server, the mounted web UI's included, answers without K."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import pytest

pytestmark = pytest.mark.e2e

KEY = "sk-guard-42"


@pytest.fixture(scope="module")
def guarded(embedded_bundle) -> Iterator[tuple[str, object]]:
    """The API with the UI mounted at /ui and a key, served by uvicorn on 127.0.0.1 in a thread."""
    from in_thread_server import serve_in_thread

    from vishwamai_edge.runtime.engine import Engine
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.serve.app import create_app
    from vishwamai_edge.ui.app import mount_ui

    engine = Engine.load(embedded_bundle, RuntimeOptions(n_threads=1, parallel=None), max_queue=4)
    app = create_app(engine, api_key=KEY)
    mount_ui(app, engine, "/ui")
    try:
        with serve_in_thread(app) as url:
            yield url, app
    finally:
        engine.close()


def every_route(app) -> list[tuple[str, str]]:
    """(method, concrete path) for every route of the app and of every app mounted in it."""
    from starlette.routing import Mount, Route, WebSocketRoute

    out: list[tuple[str, str]] = []

    def walk(routes, prefix: str) -> None:
        for r in routes:
            included = getattr(r, "original_router", None)  # FastAPI's include_router, newer versions
            if included is not None:
                walk(included.routes, prefix + r.include_context.prefix)
            elif isinstance(r, Mount):
                walk(r.routes, prefix + r.path)
            elif isinstance(r, (Route, WebSocketRoute)):
                path = prefix + r.path
                for name in r.param_convertors:  # any value will do: the key is checked first
                    path = path.replace("{" + name + ":path}", "x").replace("{" + name + "}", "x")
                methods = sorted(r.methods - {"HEAD"}) if isinstance(r, Route) and r.methods else ["WS"]
                out.extend((m, path) for m in methods)

    walk(app.routes, "")
    return out


def test_the_app_has_the_routes_we_think(guarded):
    _, app = guarded
    paths = {p for _, p in every_route(app)}
    assert {"/health", "/v1/models", "/v1/chat/completions"} <= paths
    assert any(p.startswith("/ui/gradio_api/queue") for p in paths)  # the UI's queue
    assert any(p.startswith("/ui/gradio_api/upload") for p in paths)  # and its uploads
    assert len(paths) > 20


def test_every_route_refuses_a_request_without_the_key(guarded):
    url, app = guarded
    routes = every_route(app) + [("GET", "/no/such/route"), ("GET", "/ui/no/such/file.js")]
    wrong = {"Authorization": "Bearer sk-wrong"}
    basic_wrong = {"Authorization": "Basic " + base64.b64encode(b"edge:sk-wrong").decode()}
    with httpx.Client(base_url=url, timeout=60) as http:
        for method, path in routes:
            if method == "WS":
                continue  # the middleware closes these too; gradio 6 serves none
            for headers in ({}, wrong, basic_wrong):
                r = http.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"].startswith("Basic")  # a browser asks for the key


def test_the_key_opens_the_api_and_the_page(guarded):
    url, _ = guarded
    bearer = {"Authorization": f"Bearer {KEY}"}
    basic = {"Authorization": "Basic " + base64.b64encode(f"anyone:{KEY}".encode()).decode()}
    with httpx.Client(base_url=url, timeout=120) as http:
        assert http.get("/health", headers=bearer).status_code == 200
        assert http.get("/v1/models", headers=basic).json()["data"][0]["object"] == "model"
        page = http.get("/ui/", headers=basic)
        assert page.status_code == 200 and "<html" in page.text.lower()
        r = http.post("/v1/chat/completions", headers=bearer, json={
            "model": http.get("/v1/models", headers=bearer).json()["data"][0]["id"], "max_tokens": 16,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
