"""Real `serve --ui` (with and without an API key) and `ui` processes on 127.0.0.1, attacked by the tests.

Every process gets HF_ENDPOINT pointed at a local recorder standing in for the Hub and a fake HF token
in its environment, so a request the server makes on its own (run history, a file fetch) is seen there.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from in_thread_server import free_port
from serve_process import start_server, stop_server

API_KEY = "sk-security-0123456789"
HF_TOKEN = "hf_securitytestFAKEtoken000"
MAX_FILE_MB = 1


class Recorder:
    """An HTTP listener that answers 200 `{}` to anything and records (method, path, headers)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                recorder.requests.append((self.command, self.path, dict(self.headers)))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = do_PATCH = _any

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Target:
    name: str
    root: str  # http://127.0.0.1:PORT
    ui: str  # the page's base URL, no trailing slash
    proc: subprocess.Popen
    api_key: str = ""

    def headers(self, **extra: str) -> dict[str, str]:
        auth = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return {**auth, **extra}


@pytest.fixture(scope="session")
def hub_recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.close()


@pytest.fixture(scope="session")
def server_env(hub_recorder, tmp_path_factory) -> dict[str, str]:
    return {"HF_ENDPOINT": hub_recorder.url, "HF_TOKEN": HF_TOKEN,
            "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio-cache"))}


def start_ui(bundle: Path, log: Path, env: dict[str, str], *args: str) -> Target:
    import os

    port = free_port()
    cmd = [sys.executable, "-m", "vishwamai_edge.cli", "ui", str(bundle), "--port", str(port), "--threads", "1",
           "--max-file-mb", str(MAX_FILE_MB), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the ui exited with {proc.returncode}:\n{log.read_text()}")
        try:
            httpx.get(root + "/config", timeout=5).raise_for_status()
            return Target("ui", root, root, proc)
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the ui did not answer within 120 s:\n{log.read_text()}")


@pytest.fixture(scope="session", params=["serve --ui", "serve --ui --api-key", "ui"])
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
