"""The Gradio page on the embedded model, in this process, and a headless Debian Chromium to drive it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import missing

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
MAX_FILE_MB = 1


@pytest.fixture(scope="session")
def max_file_mb() -> float:
    return MAX_FILE_MB


@pytest.fixture(scope="module")
def ui_engine(embedded_bundle):
    from vishwamai_edge.runtime.engine import Engine
    from vishwamai_edge.runtime.options import RuntimeOptions

    engine = Engine.load(embedded_bundle, RuntimeOptions(n_threads=1, parallel=None), max_queue=4)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def ui_url(ui_engine) -> Iterator[str]:
    from in_thread_server import launched_ui

    with launched_ui(ui_engine, MAX_FILE_MB) as url:
        yield url


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium, headless, driven by Playwright."""
    if not Path(CHROMIUM).exists():
        missing("Chromium is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def browser(chromium):
    """A fresh browser context (its own cookies, cache and storage, like a new profile)."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    yield context
    context.close()


@pytest.fixture
def page(browser, ui_url):
    """A fresh tab on the chat page; every request it makes is recorded in `page.requested`."""
    page = browser.new_page()
    page.requested = []
    page.on("request", lambda req: page.requested.append(req.url))
    page.goto(ui_url, wait_until="networkidle")
    page.wait_for_selector("#prompt textarea")
    yield page
    page.close()


@pytest.fixture(scope="module")
def mounted_url(ui_engine) -> Iterator[str]:
    """The API server with the page mounted at /ui (`serve --ui`), on the same engine, in a thread."""
    from in_thread_server import serve_in_thread

    from vishwamai_edge.serve.app import create_app
    from vishwamai_edge.ui.app import mount_ui

    app = create_app(ui_engine)
    mount_ui(app, ui_engine, "/ui", max_file_mb=MAX_FILE_MB)
    with serve_in_thread(app) as url:
        yield url


# -- a vision-language bundle (tests/vlm_bundles.py builds it once per session) -------------
from vlm_bundles import vlm_bundle  # noqa: E402,F401
