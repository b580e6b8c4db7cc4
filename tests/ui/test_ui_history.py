"""The chat page's history -> engine messages: images sent earlier are read back from gradio's
upload folder (and only from there), charged to the turn's media budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vishwamai_edge.errors import InputError
from vishwamai_edge.runtime.media import ImagePart, MediaBudget, TextPart, UnsupportedInputError
from vishwamai_edge.ui.app import _history_messages


@pytest.fixture
def upload_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    (tmp_path / "gradio" / "abc").mkdir(parents=True)
    return tmp_path / "gradio"


def png(path: Path, pixels: np.ndarray) -> str:
    from PIL import Image

    Image.fromarray(pixels).save(path)
    return str(path)


def as_gradio_sends_it(path: str, text: str, reply: str) -> list[dict]:
    return [
        {"role": "user", "content": [
            {"type": "file", "file": {"path": path, "mime_type": "image/png", "meta": {"_type": "gradio.FileData"}},
             "alt_text": None},
            {"type": "text", "text": text}]},
        {"role": "assistant", "content": [{"type": "text", "text": reply}]},
    ]


def test_history_image_comes_back_as_pixels(upload_dir):
    pixels = np.random.default_rng(0).integers(0, 256, (45, 29, 3), dtype=np.uint8)
    path = png(upload_dir / "abc" / "pic.png", pixels)
    budget = MediaBudget(accepts={"image"})
    user, bot = _history_messages(as_gradio_sends_it(path, "What is it?", "  A cat.\n"), budget)
    assert user.role == "user" and isinstance(user.parts[0], ImagePart) and user.parts[1] == TextPart("What is it?")
    assert np.array_equal(user.parts[0].pixels, pixels)
    assert budget.pixels_left == MediaBudget().pixels_left - 45 * 29  # charged like a new upload
    assert bot.role == "assistant" and bot.parts == (TextPart("  A cat.\n"),)  # verbatim


def test_plain_string_history_still_reads():
    out = _history_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                             {"role": "assistant", "content": [{"type": "text", "text": ""}]}], MediaBudget())
    assert [(m.role, m.parts) for m in out] == [("user", (TextPart("hi"),)), ("assistant", (TextPart("hello"),))]


def test_history_file_outside_the_upload_folder_is_refused(upload_dir, tmp_path):
    outside = png(tmp_path / "secret.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="not one uploaded here"):
        _history_messages(as_gradio_sends_it(outside, "x", "y"), MediaBudget())
    escape = str(upload_dir / "abc" / ".." / ".." / "secret.png")
    with pytest.raises(InputError, match="not one uploaded here"):
        _history_messages(as_gradio_sends_it(escape, "x", "y"), MediaBudget())


def test_history_image_gone_from_the_cache(upload_dir):
    with pytest.raises(InputError, match="no longer on the server"):
        _history_messages(as_gradio_sends_it(str(upload_dir / "abc" / "gone.png"), "x", "y"), MediaBudget())


def test_history_image_to_a_text_only_bundle(upload_dir):
    path = png(upload_dir / "abc" / "pic.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UnsupportedInputError, match="no image encoder"):
        _history_messages(as_gradio_sends_it(path, "x", "y"), MediaBudget(accepts=set()))
