"""A local stand-in for the Hugging Face Hub: the routes `huggingface_hub.snapshot_download` calls.

Read from huggingface_hub 2.4 (`_snapshot_download.py`, `file_download.py`, `hf_api.py`,
`utils/_http.py`):

    GET  /api/models/{org}/{name}/revision/{rev}   repo_info: {"id", "sha", "siblings"}
    GET  /api/models/{org}/{name}/tree/{sha}       list_repo_tree (?recursive=..): [{"type", "path", "size", "oid", "lfs"}]
    HEAD /{org}/{name}/resolve/{rev}/{path}        X-Repo-Commit, ETag, Content-Length (the file's metadata)
    GET  /{org}/{name}/resolve/{rev}/{path}        the bytes; `Range: bytes=N-` answered with 206

Errors as the Hub sends them: 404 + `X-Error-Code: RepoNotFound` / `RevisionNotFound` /
`EntryNotFound`, 401 + `X-Error-Code: GatedRepo` for a gated repo's files without the token.
Every request is recorded (`requests`), and `drop[path] = n` makes the next n GETs of that
file send half of it (or nothing, `drop_after=0`) and close the connection.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class StandInRepo:
    files: dict[str, bytes]
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha

    @property
    def sha(self) -> str:
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        return h.hexdigest()

    def commit(self, rev: str) -> str | None:
        sha = self.sha
        if rev in (sha, "main"):
            return sha
        return self.branches.get(rev)


class HubStandIn:
    def __init__(self, token: str = "hf_standin_token"):
        self.repos: dict[str, StandInRepo] = {}
        self.token = token
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.drop: dict[str, int] = {}
        self.drop_fraction = 0.5
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def add_repo(self, repo_id: str, files: dict[str, bytes | Path] | Path, gated: bool = False) -> StandInRepo:
        if isinstance(files, Path):
            files = {p.name: p for p in sorted(files.iterdir()) if p.is_file()}
        data = {k: v.read_bytes() if isinstance(v, Path) else v for k, v in files.items()}
        repo = self.repos[repo_id] = StandInRepo(data, gated)
        return repo

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def gets(self, filename: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith(f"/{filename}")]

    def __enter__(self) -> HubStandIn:
        standin = self

        class Handler(_Handler):
            hub = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._route(body=True)

    def do_HEAD(self) -> None:
        self._route(body=False)

    # -- routing ---------------------------------------------------------------------------
    def _route(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.hub._lock:
            self.hub.requests.append((self.command, path, self.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            return self._api(f"{parts[2]}/{parts[3]}", parts[4], parts[5], body)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body)
        self._send(404, b"", {}, body)

    def _find(self, repo_id: str, rev: str, body: bool) -> tuple[StandInRepo, str] | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._send(404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body)
            return None
        sha = repo.commit(rev)
        if sha is None:
            self._send(404, b'{"error":"Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}, body)
            return None
        return repo, sha

    def _api(self, repo_id: str, route: str, rev: str, body: bool) -> None:
        found = self._find(repo_id, rev, body)
        if found is None:
            return
        repo, sha = found
        if route == "revision":
            data = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                    "gated": "manual" if repo.gated else False,
                    "siblings": [{"rfilename": name} for name in sorted(repo.files)]}
        else:
            data = [
                {"type": "file", "path": name, "size": len(content), "oid": _git_oid(content),
                 "lfs": {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}}
                for name, content in sorted(repo.files.items())
            ]
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"}, body)

    def _resolve(self, repo_id: str, rev: str, filename: str, body: bool) -> None:
        found = self._find(repo_id, rev, body)
        if found is None:
            return
        repo, sha = found
        if repo.gated and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            self._send(401, b'{"error":"Access to model is restricted"}',
                       {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model is restricted."}, body)
            return
        if filename not in repo.files:
            self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, body)
            return
        content = repo.files[filename]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start, status = 0, 200
        rng = self.headers.get("Range")
        if body and rng and rng.startswith("bytes=") and rng.endswith("-"):
            start, status = int(rng[6:-1]), 206
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        part = content[start:]
        if body and self._take_drop(filename):
            self._drop(status, part, headers)
            return
        headers["Content-Length"] = str(len(part) if body else len(content))
        self._send(status, part, headers, body, length_set=True)

    # -- responses -------------------------------------------------------------------------
    def _take_drop(self, filename: str) -> bool:
        with self.hub._lock:
            left = self.hub.drop.get(filename, 0)
            if left > 0:
                self.hub.drop[filename] = left - 1
                return True
        return False

    def _drop(self, status: int, part: bytes, headers: dict[str, str]) -> None:
        """Announce the whole file, send some of it, and cut the connection."""
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(part))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(part[: int(len(part) * self.hub.drop_fraction)])
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool, length_set: bool = False) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if not length_set:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


def _git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
