"""Helpers for the attack tests: the processes attacked, a recorder standing in for the Hub, a chat turn."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from in_thread_server import free_port

API_KEY = "sk-security-0123456789"
HF_TOKEN = "hf_securitytestFAKEtoken000"
API_TARGETS = ["serve --ui", "serve --ui --api-key"]  # the processes that serve the OpenAI API
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



def chat(target: Target, history: list, text: str = "hi", **headers: str) -> str:
    """One turn through gradio's HTTP API (`/gradio_api/call/chat`); the whole event stream as text."""
    data = [text, None, None, history, "", 0.0, 0.95, 4, 0, None, "base model", ""]  # "": no JSON schema
    r = httpx.post(f"{target.ui}/gradio_api/call/chat", json={"data": data}, headers=target.headers(**headers),
                   timeout=60)
    assert r.status_code == 200, r.text
    event = r.json()["event_id"]
    with httpx.stream("GET", f"{target.ui}/gradio_api/call/chat/{event}", headers=target.headers(),
                      timeout=120) as s:
        return "".join(s.iter_text())
