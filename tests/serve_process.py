"""A real `vishwamai-edge serve` process on 127.0.0.1, started and stopped by tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from in_thread_server import free_port


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    model: str
    api_key: str
    max_request_mb: float = 20

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def health(self) -> dict:
        return httpx.get(self.url + "/health", headers=self.headers(), timeout=60).json()


def start_server(bundle: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> LiveServer:
    port = free_port()
    # One thread: llama.cpp's spinning thread pool collapses when its threads share busy cores
    # (on this 2-core machine under load: 40 tokens/s with 1 thread, 1-6 with 2).
    cmd = [sys.executable, "-m", "vishwamai_edge.cli", "serve", str(bundle), "--port", str(port),
           "--threads", "1", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    key = (env or {}).get("VISHWAMAI_EDGE_API_KEY", "")
    if "--api-key" in args:
        key = args[args.index("--api-key") + 1]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            health = httpx.get(url + "/health", headers=headers, timeout=5).json()
            live = LiveServer(url, proc, health["model"], key)
            if "--max-request-mb" in args:
                live.max_request_mb = float(args[args.index("--max-request-mb") + 1])
            return live
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not answer within 120 s:\n{log.read_text()}")


def stop_server(server: LiveServer) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
