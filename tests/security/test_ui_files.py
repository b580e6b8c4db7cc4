"""No file a client names leaves the device through the chat page, and the page calls nobody.

Attacks from issue 30, against real processes (`serve --ui` with and without a key, `ui`): a chat
history naming a server path (plain, through a symlink, under /proc), an http(s) URL as a file, the
run-history bucket header, gradio's `file=<url>` fetcher, and a DNS-rebinding Host header.
"""

from __future__ import annotations

import json
import re
import secrets
import time

import httpx
import pytest
from security_targets import HF_TOKEN, chat

pytestmark = pytest.mark.e2e


def named_file(path: str) -> list:
    return [{"role": "user", "content": [
                {"type": "file", "file": {"path": path, "meta": {"_type": "gradio.FileData"}}, "alt_text": None}]},
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]


def served_files(target, events: str) -> list[bytes]:
    """Every file the reply points at, fetched as a browser would."""
    urls = set(re.findall(r'"url":\s*"([^"]*gradio_api/file=[^"]*)"', events))
    urls |= {target.ui + "/gradio_api/file=" + p for p in re.findall(r'"path":\s*"([^"]+)"', events)}
    out = []
    for url in urls:
        url = url if url.startswith("http") else target.root + url
        r = httpx.get(url, headers=target.headers(), timeout=30)
        if r.status_code == 200:
            out.append(r.content)
    return out


@pytest.fixture(scope="module")
def secret(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secret")
    token = secrets.token_hex(16)
    (folder / "token.txt").write_text(token)
    (folder / "link.png").symlink_to(folder / "token.txt")
    return folder, token


@pytest.mark.parametrize("kind", ["plain", "symlink", "proc", "passwd"])
def test_a_path_in_the_history_is_never_read(target, secret, kind):
    folder, token = secret
    path, marker = {"plain": (str(folder / "token.txt"), token), "symlink": (str(folder / "link.png"), token),
                    "proc": ("/proc/self/environ", HF_TOKEN), "passwd": ("/etc/passwd", "root:")}[kind]
    events = chat(target, named_file(path))
    assert "event: error" in events and marker not in events
    assert not [body for body in served_files(target, events) if marker.encode() in body]
    assert "not uploaded" in events or "not one uploaded here" in events, events


def test_a_url_as_a_file_is_not_fetched(target, hub_recorder):
    before = len(hub_recorder.requests)
    events = chat(target, named_file(hub_recorder.url + "/secret.png"))
    assert "event: error" in events
    r = httpx.get(f"{target.ui}/gradio_api/file=https://example.com/x.png", headers=target.headers(), timeout=30)
    assert r.status_code in (403, 404), r.text
    r = httpx.get(f"{target.ui}/gradio_api/file={hub_recorder.url}/x.png", headers=target.headers(), timeout=30)
    assert r.status_code in (403, 404), r.text
    assert hub_recorder.requests[before:] == []


def test_run_history_is_off_and_the_bucket_header_calls_nobody(target, hub_recorder):
    config = httpx.get(f"{target.ui}/config", headers=target.headers(), timeout=30).json()
    assert config.get("run_history") is False
    before = len(hub_recorder.requests)
    events = chat(target, [], "Say hello.", **{"x-gradio-history-bucket": "attacker/bucket"})
    assert "event: complete" in events, events
    time.sleep(1.0)  # gradio files a run in the background after the reply
    assert hub_recorder.requests[before:] == []
    assert httpx.get(f"{target.ui}/gradio_api/runs", headers=target.headers(), timeout=30).status_code == 404


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.nip.io", "attacker.localhost."])
def test_a_rebinding_host_is_refused(target, host):
    for url in (f"{target.ui}/", f"{target.ui}/config"):
        r = httpx.get(url, headers=target.headers(Host=host), timeout=30)
        assert r.status_code == 400, (url, r.status_code)
        assert "Host" in r.text and len(r.text) < 500
    r = httpx.post(f"{target.ui}/gradio_api/call/chat", json={"data": []}, headers=target.headers(Host=host),
                   timeout=30)
    assert r.status_code == 400


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_the_loopback_names_are_accepted(target, host):
    port = target.root.rsplit(":", 1)[1]
    r = httpx.get(f"{target.ui}/config", headers=target.headers(Host=f"{host}:{port}"), timeout=30)
    assert r.status_code == 200
    assert json.loads(r.text)
