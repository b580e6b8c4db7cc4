"""The web chat on a tiny LLaVA bundle in headless Chromium: an uploaded image is answered as the
in-process session answers it, shown in the history, and still seen by the next (text-only) turn."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_ui_browser import WAIT_MS, send, wait_for_stats
from vlm_bundles import in_process_answers, photo

pytestmark = pytest.mark.e2e

PROMPT = "What is in this picture?"
FOLLOW_UP = "And what colour is it?"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def vlm_engine(vlm_bundle):
    from vishwamai_edge.runtime.engine import Engine
    from vishwamai_edge.runtime.options import RuntimeOptions

    engine = Engine.load(vlm_bundle, RuntimeOptions(n_threads=1, parallel=None), max_queue=4)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def vlm_url(vlm_engine) -> Iterator[str]:
    from in_thread_server import launched_ui

    with launched_ui(vlm_engine, 1) as url:
        yield url


@pytest.fixture
def vlm_page(browser, vlm_url):
    page = browser.new_page()
    page.goto(vlm_url, wait_until="networkidle")
    page.wait_for_selector("#prompt textarea")
    page.click("text=Settings")
    set_max_tokens(page, MAX_TOKENS)
    yield page
    page.close()


def set_max_tokens(page, n: int) -> None:
    """Type into the slider's number box until the slider takes it (a box typed into while the
    accordion is still opening may lose the value)."""
    box = "#max-tokens input[type=number]"
    for _ in range(10):
        page.fill(box, str(n))
        page.press(box, "Enter")
        page.locator(box).blur()
        try:
            page.wait_for_function("v => document.querySelector('#max-tokens input[type=range]').value === v",
                                   arg=str(n), timeout=2000)
            return
        except Exception:  # playwright's TimeoutError: type it again
            page.wait_for_timeout(200)
    raise AssertionError(f"the max-tokens slider did not take {n}")


def bot_texts(page) -> list[str]:
    return [t.strip() for t in page.locator("#chat .bot-row").all_inner_texts()]


def wait_for_answers(page, n: int) -> list[str]:
    page.wait_for_function("n => document.querySelectorAll('#chat .bot-row').length >= n", arg=n, timeout=WAIT_MS)
    wait_for_stats(page, "generated tokens")  # the final line: the answer is complete
    return bot_texts(page)


def answer_without_image(bundle, first: str) -> str:
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(bundle, RuntimeOptions(n_threads=1))
    try:
        session = pipeline.session(max_tokens=MAX_TOKENS)
        session.messages += [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first}]
        return "".join(session.ask(FOLLOW_UP))
    finally:
        pipeline.close()


def test_image_answered_shown_and_kept_for_the_next_turn(vlm_page, vlm_bundle, tmp_path):
    from PIL import Image

    page = vlm_page
    assert page.locator("#image").is_visible() and not page.locator("#audio").is_visible()  # what the bundle takes
    picture = photo(45, 29, 21)
    Image.fromarray(picture).save(tmp_path / "pic.png")
    first, second = in_process_answers(vlm_bundle, [(PROMPT, [picture]), (FOLLOW_UP, [])], MAX_TOKENS)
    assert second != answer_without_image(vlm_bundle, first)  # so the second turn shows the image was kept
    page.set_input_files("#image input[type=file]", str(tmp_path / "pic.png"))
    page.wait_for_selector("#image img", timeout=WAIT_MS)  # uploaded: the preview shows
    send(page, PROMPT)
    answers = wait_for_answers(page, 1)
    assert answers[-1] == first.strip()
    # the picture is in the history, served by gradio's file route, and the upload box is cleared
    img = page.locator("#chat .user-row img")
    assert img.count() == 1 and "/gradio_api/file=" in img.first.get_attribute("src")
    size = img.first.evaluate("e => [e.naturalWidth, e.naturalHeight]")
    assert size == [29, 45]
    assert page.locator("#image img").count() == 0
    send(page, FOLLOW_UP)  # text only: the image must still reach the model from the history
    answers = wait_for_answers(page, 2)
    assert answers[-1] == second.strip()
    assert page.locator("#chat .user-row img").count() == 1


def test_broken_image_refused_and_inputs_kept(vlm_page, tmp_path):
    page = vlm_page
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image" * 10)
    page.set_input_files("#image input[type=file]", str(bad))
    page.wait_for_selector("#image img", state="attached", timeout=WAIT_MS)  # uploaded (its preview is broken)
    send(page, PROMPT)
    stats = wait_for_stats(page, "cannot be decoded")
    assert stats.startswith("⚠️")
    assert page.locator("#chat .user-row").count() == 0  # refused turns stay out of the conversation
    assert page.input_value("#prompt textarea") == PROMPT



def test_a_drawing_becomes_a_picture_on_white():
    """The pad's value as gradio hands it over: RGBA layers over no background."""
    import numpy as np
    from PIL import Image

    from vishwamai_edge.ui.app import _drawing

    blank = np.zeros((224, 224, 4), np.uint8)
    assert _drawing({"background": None, "layers": [blank], "composite": blank}) is None
    assert _drawing({"background": None, "layers": [], "composite": None}) is None
    stroke = blank.copy()
    stroke[100:120, 50:150] = (255, 0, 0, 255)
    stroke[0:10, 0:10] = (0, 0, 255, 128)  # half transparent blue over white
    path = _drawing({"background": None, "layers": [stroke], "composite": stroke})
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (224, 224, 3)
    assert tuple(pixels[110, 100]) == (255, 0, 0) and tuple(pixels[200, 200]) == (255, 255, 255)
    assert tuple(pixels[5, 5]) == (127, 127, 255)
