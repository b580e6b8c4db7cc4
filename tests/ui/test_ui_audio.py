"""The web chat on the speech bundle (SmolLM2 + Whisper tiny.en) in headless Chromium: an uploaded
spoken question is heard, what was heard shows in the history, and the streamed answer follows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from speech_bundles import QUESTION, question_wav, speech_bundle  # noqa: F401  (shared session fixtures)
from test_ui_browser import WAIT_MS, wait_for_stats


@pytest.fixture(scope="module")
def speech_url(speech_bundle) -> Iterator[str]:
    from in_thread_server import launched_ui

    from vishwamai_edge.runtime.engine import Engine
    from vishwamai_edge.runtime.options import RuntimeOptions

    engine = Engine.load(speech_bundle, RuntimeOptions(n_threads=2, parallel=None), max_queue=4)
    try:
        with launched_ui(engine, 1) as url:
            yield url
    finally:
        engine.close()


def user_texts(page) -> list[str]:
    return [t.strip() for t in page.locator("#chat .user-row").all_inner_texts()]


@pytest.mark.e2e
@pytest.mark.slow
def test_spoken_question_heard_shown_and_answered(browser, speech_url, question_wav):
    page = browser.new_page()
    try:
        page.goto(speech_url, wait_until="networkidle")
        page.wait_for_selector("#prompt textarea")
        assert page.locator("#audio").is_visible() and not page.locator("#image").is_visible()
        page.set_input_files("#audio input[type=file]", str(question_wav))
        page.wait_for_selector("#audio audio, #audio .waveform-container, #audio [data-testid='waveform-x']",
                               state="attached", timeout=WAIT_MS)  # uploaded: the player shows
        page.click("#send")
        page.wait_for_function(
            "q => [...document.querySelectorAll('#chat .user-row')].some(e => e.innerText.includes(q))",
            arg=f"heard: {QUESTION}", timeout=WAIT_MS,
        )
        page.wait_for_function(
            "() => [...document.querySelectorAll('#chat .bot-row')].some(e => e.innerText.includes('Paris'))",
            timeout=WAIT_MS,
        )
        stats = wait_for_stats(page, "generated tokens")  # the final line: the answer is complete
        assert "⚠️" not in stats
        assert user_texts(page) == [f"🎤 heard: {QUESTION}"]
        assert "Paris" in page.locator("#chat .bot-row").last.inner_text()
    finally:
        page.close()


def test_heard_text_is_what_later_turns_send():
    from vishwamai_edge.runtime.media import MediaBudget
    from vishwamai_edge.ui.app import _history_messages, _said

    assert _said("", True, None) == "🎤 listening…"
    assert _said("", True, [QUESTION]) == f"🎤 heard: {QUESTION}"
    assert _said("Answer briefly.", True, [QUESTION]) == f"🎤 heard: {QUESTION}\n\nAnswer briefly."
    assert _said("", True, ["  "]) == "🎤 heard nothing"
    assert _said("hi ", False, None) == "hi "
    history = [{"role": "user", "content": [{"type": "text", "text": _said("Answer briefly.", True, [QUESTION])}]},
               {"role": "assistant", "content": [{"type": "text", "text": "🎤 heard: kept as said"}]},
               {"role": "user", "content": [{"type": "text", "text": _said("only typed", True, [""])}]}]
    user, bot, user2 = _history_messages(history, MediaBudget(accepts=set()))  # no audio is sent again
    assert user.parts[0].text == f"{QUESTION} Answer briefly."  # as the engine joined that turn's parts
    assert bot.parts[0].text == "🎤 heard: kept as said"  # only user messages are read back
    assert user2.parts[0].text == "only typed"
