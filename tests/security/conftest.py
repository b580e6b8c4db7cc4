"""Real `serve --ui` (with and without an API key) and `ui` processes on 127.0.0.1, attacked by the tests.

Every process gets HF_ENDPOINT pointed at a local recorder standing in for the Hub and a fake HF token
in its environment, so a request the server makes on its own (run history, a file fetch) is seen there.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from security_targets import API_KEY, API_TARGETS, HF_TOKEN, Recorder, Target, start_ui
from serve_process import start_server, stop_server


@pytest.fixture(scope="session")
def hub_recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.close()


@pytest.fixture(scope="session")
def server_env(hub_recorder, tmp_path_factory) -> dict[str, str]:
    return {"HF_ENDPOINT": hub_recorder.url, "HF_TOKEN": HF_TOKEN,
            "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio-cache"))}


@pytest.fixture(scope="session", params=[*API_TARGETS, "ui"])
def target(request, embedded_bundle, server_env, tmp_path_factory) -> Iterator[Target]:
    log = tmp_path_factory.mktemp("security") / "server.log"
    if request.param == "ui":
        live = start_ui(embedded_bundle, log, server_env)
        yield live
        live.proc.terminate()
        live.proc.wait(30)
        return
    key = ["--api-key", API_KEY] if request.param.endswith("--api-key") else []
    server = start_server(embedded_bundle, log, "--ui", "--max-request-mb", "1", "--parallel", "1", *key,
                          env=server_env)
    yield Target(request.param, server.url, server.url + "/ui", server.proc, server.api_key)
    stop_server(server)
