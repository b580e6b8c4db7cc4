"""Bodies without a Content-Length (chunked) are bounded as they arrive: the server's memory stays put.

The attack: a multipart body streamed in 1 MiB chunks, never declaring its length, into a form
field (gradio's upload parser keeps a field in memory, however large) or the API's upload route.
The client stops at 64 MiB whatever happens (a bounded loop on 127.0.0.1) and watches the server's
resident set; the server must answer 413 long before that.
"""

from __future__ import annotations

import select
import socket
from urllib.parse import urlsplit

import pytest
from speech_bundles import speech_bundle  # noqa: F401  (the shared session fixture)

pytestmark = pytest.mark.e2e

CHUNK = 2**20
SEND_AT_MOST_MB = 64
RSS_GROWTH_AT_MOST_MB = 40  # the server's whole budget for this request (the limits are 1-21 MiB)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def stream_field(target, path: str) -> tuple[bytes, int, float]:
    """POST a chunked multipart body with one endless form field; (reply head, MiB sent, peak RSS growth)."""
    url = urlsplit(target.root)
    boundary = "b0undary1234"
    auth = "".join(f"{k}: {v}\r\n" for k, v in target.headers().items())
    head = (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nTransfer-Encoding: chunked\r\n{auth}"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    part = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            f'Content-Type: audio/wav\r\n\r\n' if "audio" in path else
            f'--{boundary}\r\nContent-Disposition: form-data; name="field"\r\n\r\n').encode()
    before = peak = rss_mb(target.proc.pid)
    reply, sent = b"", 0
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(head + b"%x\r\n%s\r\n" % (len(part), part))
        block = b"%x\r\n%s\r\n" % (CHUNK, b"a" * CHUNK)
        for sent in range(1, SEND_AT_MOST_MB + 1):
            try:
                s.sendall(block)
            except OSError:  # the server answered and closed
                break
            if sent % 4 == 0:
                peak = max(peak, rss_mb(target.proc.pid))
            if select.select([s], [], [], 0)[0]:
                break  # an answer came: stop sending, as a client that reads would
        peak = max(peak, rss_mb(target.proc.pid))
        try:
            s.settimeout(10)
            reply = s.recv(4096)
        except OSError:
            pass
    return reply, sent, peak - before


def routes(target) -> list[str]:
    ui = urlsplit(target.ui).path
    api = ["/v1/audio/transcriptions", "/v1/chat/completions"] if target.name.startswith("serve") else []
    return [f"{ui}/gradio_api/upload", *api]


def test_a_chunked_body_is_cut_off_and_memory_stays_bounded(target):
    for path in routes(target):
        reply, sent, growth = stream_field(target, path)
        print(f"{target.name} {path}: refused after {sent} MiB sent, RSS grew {growth:.0f} MiB: {reply[:12]!r}")
        assert growth < RSS_GROWTH_AT_MOST_MB, (path, growth)
        assert sent < 32, (path, sent)  # refused near the limit, not after the client gave up
        # this bundle has no audio encoder: the transcription route may refuse before reading (400)
        allowed = (b"HTTP/1.1 413", b"HTTP/1.1 400") if "audio" in path else (b"HTTP/1.1 413",)
        assert reply.startswith(allowed), (path, reply[:200])


@pytest.mark.slow  # builds the speech bundle (real Whisper tiny.en)
def test_a_chunked_audio_upload_to_a_speech_bundle_is_cut_off(speech_bundle, tmp_path):
    """The issue's route on a bundle that really transcribes: it reads the file part, so only the
    byte count as the body arrives stops it."""
    from security_targets import Target
    from serve_process import start_server, stop_server

    server = start_server(speech_bundle, tmp_path / "server.log", "--max-request-mb", "1")
    try:
        target = Target("serve", server.url, server.url + "/ui", server.proc, server.api_key)
        reply, sent, growth = stream_field(target, "/v1/audio/transcriptions")
        print(f"speech bundle: refused after {sent} MiB sent, RSS grew {growth:.0f} MiB: {reply[:12]!r}")
        assert reply.startswith(b"HTTP/1.1 413") and sent < 8 and growth < RSS_GROWTH_AT_MOST_MB, (reply[:200], growth)
    finally:
        stop_server(server)
