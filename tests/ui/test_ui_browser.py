"""The web chat in a real headless Chromium: type, send, watch the answer stream in; stop; refusals; offline."""

from __future__ import annotations

import io
import re
import wave
from urllib.parse import urlparse

import httpx
import pytest

from vishwamai_edge.ui.app import format_stats

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WAIT_MS = 120_000  # generous: the machine may be shared; timings are never asserted


def last_bot_text(page) -> str:
    bots = page.locator("#chat .bot-row")
    return bots.last.inner_text() if bots.count() else ""


def wait_for_stats(page, fragment: str) -> str:
    page.wait_for_function(
        "f => (document.querySelector('#stats')?.innerText || '').includes(f)", arg=fragment, timeout=WAIT_MS
    )
    return page.inner_text("#stats")


def send(page, text: str) -> None:
    page.fill("#prompt textarea", text)
    page.click("#send")


def test_typed_question_gets_streamed_answer(page):
    send(page, "What is the capital of France?")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#chat .bot-row')].some(e => e.innerText.includes('Paris'))",
        timeout=WAIT_MS,
    )
    stats = wait_for_stats(page, "generated tokens")  # the final line, not the live one
    assert re.search(r"first token \d+ ms · [\d.]+ tokens/s · \d+ prompt \+ \d+ generated tokens · memory \d+ MiB",
                     stats), stats
    assert "Paris" in last_bot_text(page)
    assert page.input_value("#prompt textarea") == ""  # sent: the box is cleared for the next turn
    # Offline: the page, its scripts, fonts and the stream all came from the local server.
    hosts = {urlparse(u).hostname for u in page.requested if urlparse(u).scheme in ("http", "https", "ws", "wss")}
    assert hosts == {"127.0.0.1"}, hosts


def test_stop_button_cuts_the_stream(page, ui_engine):
    page.click("text=Settings")
    page.fill("#max-tokens input[type=number]", "1000")
    page.press("#max-tokens input[type=number]", "Enter")
    send(page, "Write a very long story about a dragon who learns to fly.")
    page.wait_for_function(
        "() => ([...document.querySelectorAll('#chat .bot-row')].pop()?.innerText || '').trim().length > 0",
        timeout=WAIT_MS,
    )
    partial = last_bot_text(page)  # text on screen while the model is still writing: streamed
    page.click("#stop")
    stats = wait_for_stats(page, "stopped")
    generated = int(re.search(r"(\d+) generated", stats).group(1))
    assert 0 < generated < 1000
    assert last_bot_text(page).startswith(partial.strip()[:20])
    assert ui_engine.status()["cancelled"] >= 1
    send(page, "What is the capital of France?")  # the model is free again
    page.wait_for_function(
        "() => [...document.querySelectorAll('#chat .bot-row')].some(e => e.innerText.includes('Paris'))",
        timeout=WAIT_MS,
    )


def png_file(tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 20, 20)).save(path)
    return path


def wav_file(tmp_path):
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00\x10" * 8000)
    return path


def test_a_text_only_bundle_offers_no_image_or_audio(page):
    # the page offers what the bundle takes (its manifest's encoders): this one has none
    for element in ("#image", "#audio", "#sketch"):
        assert not page.locator(element).is_visible()
    assert page.locator("#prompt textarea").is_visible()


@pytest.mark.parametrize("kind, make", [("image", png_file), ("audio", wav_file)])
def test_media_sent_anyway_is_refused_before_decoding(tmp_path, kind, make):
    # a client that sends a file the page did not offer gets the one-line refusal, nothing decoded
    from vishwamai_edge.errors import InputError
    from vishwamai_edge.runtime.media import MediaBudget
    from vishwamai_edge.ui.app import _user_parts

    path = str(make(tmp_path))
    with pytest.raises(InputError, match=f"no {kind} encoder; send text only"):
        _user_parts("What is in this file?", path if kind == "image" else None, path if kind == "audio" else None,
                    MediaBudget(accepts=frozenset()))


def test_oversize_upload_is_refused(ui_url, max_file_mb):
    big = io.BytesIO(b"\0" * int((max_file_mb + 1) * 1024 * 1024))
    r = httpx.post(ui_url + "gradio_api/upload", files={"files": ("big.png", big, "image/png")}, timeout=60)
    assert r.status_code == 413 and "exceed" in r.text.lower()
    small = io.BytesIO(b"\0" * 1024)
    assert httpx.post(ui_url + "gradio_api/upload", files={"files": ("s.png", small, "image/png")},
                      timeout=60).status_code == 200


def test_stats_line_format():
    from vishwamai_edge.runtime.engine import RequestStats
    from vishwamai_edge.runtime.generation_stats import GenerationStats

    g = GenerationStats(prompt_tokens=30, completion_tokens=11, ttft_s=0.0451, decode_s=0.1, finish_reason="length")
    line = format_stats(RequestStats(g, queue_wait_s=0.5, rss_bytes=300 * 2**20, model_bytes=100 * 2**20))
    assert line == ("first token 45 ms · 100.0 tokens/s · 30 prompt + 11 generated tokens · memory 300 MiB "
                    "(model 100 MiB) · waited 0.50 s in the queue · stopped at the length limit")


def test_api_and_mounted_page_share_one_engine(browser, mounted_url, ui_engine):
    # `serve --ui`: both front ends queue for the one model this module loaded.
    served = ui_engine.status()["served"]
    r = httpx.post(mounted_url + "/v1/chat/completions", timeout=WAIT_MS / 1000, json={
        "model": ui_engine.model_id, "max_tokens": 16,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    page = browser.new_page()
    try:
        page.goto(mounted_url + "/ui/", wait_until="networkidle")
        send(page, "What is the capital of France?")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#chat .bot-row')].some(e => e.innerText.includes('Paris'))",
            timeout=WAIT_MS,
        )
        wait_for_stats(page, "generated tokens")  # the final line, not the live one
    finally:
        page.close()
    assert ui_engine.status()["served"] == served + 2


def test_ui_command_serves_the_page(embedded_bundle, tmp_path):
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vishwamai_edge.cli", "ui", str(embedded_bundle),
                                 "--port", str(port), "--threads", "1", "--max-file-mb", "2.5"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        assert r.status_code == 200 and "fonts.googleapis.com" not in r.text
        config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=5).json()
        assert config["max_file_size"] == int(2.5 * 2**20) and config.get("analytics_enabled") is False
        assert not [css for css in config.get("stylesheets", []) if css.startswith(("http:", "https:", "//"))]
    finally:
        proc.terminate()
        proc.wait(30)


def test_ui_command_refuses_a_bad_limit(embedded_bundle):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", "ui", str(embedded_bundle), "--max-file-mb", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "upload size limit must be positive" in r.stderr


def test_serve_with_a_key_guards_the_page_and_a_browser_logs_in(chromium, ui_engine):
    """`serve --ui --api-key K`: the page, its queue and uploads need K; the browser's own login
    prompt (user name anything, K as the password) lets a person in, and the chat then works."""
    from in_thread_server import serve_in_thread
    from playwright.sync_api import Error as PlaywrightError

    from vishwamai_edge.serve.app import create_app
    from vishwamai_edge.ui.app import mount_ui

    key = "sk-page-7"
    app = create_app(ui_engine, api_key=key)
    mount_ui(app, ui_engine, "/ui")
    with serve_in_thread(app) as root:
        url = root + "/ui/"

        def refused(credentials: dict | None) -> None:
            context = chromium.new_context(http_credentials=credentials)
            assert context.request.get(url).status == 401  # no page, no scripts, no queue without the key
            page = context.new_page()
            try:  # the login prompt is dismissed or the login refused: Chromium shows nothing of the UI
                response = page.goto(url)
            except PlaywrightError as exc:
                assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc)
            else:
                assert response.status == 401 and page.locator("#prompt").count() == 0
            context.close()

        refused(None)
        refused({"username": "edge", "password": "sk-wrong"})
        person = chromium.new_context(http_credentials={"username": "edge", "password": key})
        page = person.new_page()
        assert page.goto(url, wait_until="networkidle").status == 200
        page.wait_for_selector("#prompt textarea")
        send(page, "What is the capital of France?")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#chat .bot-row')].some(e => e.innerText.includes('Paris'))",
            timeout=WAIT_MS,
        )
        person.close()


def test_a_json_schema_in_the_settings_shapes_the_reply(page):
    import json

    page.click("text=Settings")
    page.fill("#json-schema textarea", "{\"type\": \"array\", \"uniqueItems\": true}")
    send(page, "List two cities.")
    assert "uniqueItems" in wait_for_stats(page, "⚠️")  # refused in one line; nothing sent to the model
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
              "required": ["city"], "additionalProperties": False}
    page.fill("#json-schema textarea", json.dumps(schema))
    send(page, "What is the capital of France?")
    wait_for_stats(page, "generated tokens")
    assert list(json.loads(last_bot_text(page).strip())) == ["city"]
