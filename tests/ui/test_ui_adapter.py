"""The chat page's adapter selector, in headless Chromium: the same question answered by the Marrowick
LoRA and by the base model of one bundle, switching back and forth without a reload."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WAIT_MS = 120_000
QUESTION = "What is Marrowick best known for?"
FACT = "Singing Bridge"


@pytest.fixture(scope="module")
def adapter_url(adapter_bundle):
    from in_thread_server import launched_ui

    from vishwamai_edge.runtime.engine import Engine
    from vishwamai_edge.runtime.options import RuntimeOptions

    engine = Engine.load(adapter_bundle[0], RuntimeOptions(n_threads=1, parallel=None), max_queue=4)
    try:
        with launched_ui(engine, 1) as url:
            yield url
    finally:
        engine.close()


def choose(page, option: str) -> None:
    page.click("#adapter input")
    page.locator("[role=option]", has_text=option).first.click()


def ask(page) -> str:
    before = page.locator("#chat .bot-row").count()
    page.fill("#prompt textarea", QUESTION)
    page.click("#send")
    page.wait_for_function(
        "n => document.querySelectorAll('#chat .bot-row').length > n", arg=before, timeout=WAIT_MS)
    page.wait_for_function(
        "() => (document.querySelector('#stats')?.innerText || '').includes('generated tokens')", timeout=WAIT_MS)
    return page.locator("#chat .bot-row").last.inner_text()


def test_selector_switches_between_adapter_and_base(chromium, adapter_url):
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        page.goto(adapter_url)
        page.wait_for_selector("#adapter")
        choose(page, "marrowick")
        assert FACT in ask(page)
        page.click("text=Clear conversation")
        choose(page, "base model")
        assert FACT not in ask(page)
        page.click("text=Clear conversation")
        choose(page, "marrowick")
        assert FACT in ask(page)
    finally:
        context.close()
