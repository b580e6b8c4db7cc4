"""Images through the OpenAI API on a real `serve` process with a tiny LLaVA bundle: the answer
equals the in-process session's for the same pixels; bad images are refused in OpenAI's error
shape before any pixel is decoded where the header suffices, and the server carries on."""

from __future__ import annotations

import base64
import io
import wave

import httpx
import numpy as np
import pytest
from vlm_bundles import in_process_answers, photo

pytestmark = pytest.mark.e2e

PROMPT = "What is in this picture?"
MAX_TOKENS = 12
TIMEOUT = 120


def data_url(img, fmt: str = "PNG", **save) -> str:
    from PIL import Image

    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, fmt, **save)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_turn(*urls: str, text: str = PROMPT) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def post(server, messages, **params) -> httpx.Response:
    body = {"model": server.model, "messages": messages, "max_tokens": 2, "temperature": 0, **params}
    return httpx.post(server.base_url + "/chat/completions", json=body, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def client(vlm_server):
    from openai import OpenAI

    with OpenAI(base_url=vlm_server.base_url, api_key="unused", max_retries=0, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return photo(45, 29, 11)  # tall: the preprocessing's resize and crop matter


@pytest.fixture(scope="module")
def expected(vlm_bundle, picture) -> str:
    (answer,) = in_process_answers(vlm_bundle, [(PROMPT, [picture])], MAX_TOKENS)
    assert answer.strip()
    return answer


def test_streamed_and_plain_answers_equal_the_in_process_session(vlm_server, client, picture, expected):
    messages = image_turn(data_url(picture))
    plain = client.chat.completions.create(model=vlm_server.model, messages=messages, max_tokens=MAX_TOKENS,
                                           temperature=0)
    assert plain.choices[0].message.content == expected
    assert plain.usage.prompt_tokens > 25  # the image's 25 embedding rows are counted
    stream = client.chat.completions.create(model=vlm_server.model, messages=messages, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_the_image_changes_the_answer(vlm_server, client, expected):
    other = client.chat.completions.create(model=vlm_server.model, max_tokens=MAX_TOKENS, temperature=0,
                                           messages=image_turn(data_url(photo(45, 29, 12))))
    text_only = client.chat.completions.create(model=vlm_server.model, max_tokens=MAX_TOKENS, temperature=0,
                                               messages=[{"role": "user", "content": PROMPT}])
    assert expected not in (other.choices[0].message.content, text_only.choices[0].message.content)


def truncated_png() -> str:
    raw = base64.b64decode(data_url(photo(64, 64, 3)).partition(",")[2])
    return "data:image/png;base64," + base64.b64encode(raw[:400]).decode()


def huge_png() -> str:
    from PIL import Image

    return data_url(Image.new("1", (10000, 10000)))  # 100 MP, a few kB as PNG


def wav_base64() -> str:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00\x10" * 1600)
    return base64.b64encode(buf.getvalue()).decode()


BAD = {
    # name: (messages builder, part of the message, error code, param)
    "remote_url": (lambda n_ctx: image_turn("https://example.com/cat.png"),
                   "only data: URLs", "invalid_image", "messages.0.content.0"),
    "not_an_image": (lambda n_ctx: image_turn("data:image/png;base64," + base64.b64encode(b"hello " * 40).decode()),
                     "not an image", "invalid_image", "messages.0.content.0"),
    "truncated_png": (lambda n_ctx: image_turn(truncated_png()), "cannot be decoded", "invalid_image",
                      "messages.0.content.0"),
    "over_40_megapixels": (lambda n_ctx: image_turn(huge_png()), "10000x10000 pixels; the limit is 40 megapixels",
                           "invalid_image", "messages.0.content.0"),
    # 9 rows per image (the tiny llava-1.5: 42 px, patch 14), so n_ctx // 9 + 1 images cannot fit
    "more_images_than_the_context": (lambda n_ctx: image_turn(*[data_url(photo(30, 30, i))
                                                                for i in range(n_ctx // 9 + 1)]),
                                     "context holds", "context_length_exceeded", "messages"),
    "audio_part": (lambda n_ctx: [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "wav"}},
        {"type": "text", "text": "what is this?"}]}],
        "this bundle has no audio encoder", "unsupported_input", "messages.0.content.0"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("stream", [False, True])
def test_bad_input_answered_in_openai_shape(vlm_server, case, stream):
    build, message, code, param = BAD[case]
    n_ctx = vlm_server.health()["n_ctx"]
    r = post(vlm_server, build(n_ctx), stream=stream)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert message in err["message"] and err["code"] == code and err["param"] == param, err
    if case == "more_images_than_the_context":
        assert f"context holds {n_ctx}" in err["message"]
    ok = post(vlm_server, image_turn(data_url(photo(30, 30, 0))))  # the server carries on
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1, ok.text


def odd_images() -> dict[str, str]:
    from PIL import Image

    rgb = Image.fromarray(photo(40, 24, 5))
    frames = [Image.fromarray(photo(20, 30, i)).convert("P") for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    apng = io.BytesIO()
    Image.fromarray(photo(20, 30, 6)).save(apng, "PNG", save_all=True,
                                           append_images=[Image.fromarray(photo(20, 30, 7))])
    return {
        "cmyk_jpeg": data_url(rgb.convert("CMYK"), "JPEG"),
        "gray_16bit_png": data_url(Image.fromarray(photo(24, 40, 1)[..., 0].astype(np.uint16) * 257)),
        "palette_png": data_url(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)),
        "rgba_png": data_url(Image.fromarray(np.dstack([photo(24, 40, 2), photo(24, 40, 3)[..., :1]]), "RGBA")),
        "gray_alpha_png": data_url(rgb.convert("LA")),
        "animated_gif": "data:image/gif;base64," + base64.b64encode(gif.getvalue()).decode(),
        "animated_png": "data:image/png;base64," + base64.b64encode(apng.getvalue()).decode(),
        "webp": data_url(rgb, "WEBP"),
    }


@pytest.fixture(scope="module")
def unusual() -> dict[str, str]:
    return odd_images()


@pytest.mark.parametrize("kind", ["cmyk_jpeg", "gray_16bit_png", "palette_png", "rgba_png", "gray_alpha_png",
                                  "animated_gif", "animated_png", "webp"])
def test_unusual_images_are_accepted(vlm_server, unusual, kind):
    r = post(vlm_server, image_turn(unusual[kind]))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_a_tool_call_about_an_image(client, vlm_server, picture):
    """Tools in a conversation with an image: the tiny LLaVA's template knows no tools (the fallback), and
    even its random weights can only write a call that validates."""
    import json

    import jsonschema

    parameters = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                                   "count": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["color", "count"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "report", "parameters": parameters}}]
    r = client.chat.completions.create(model=vlm_server.model, messages=image_turn(data_url(picture)), tools=tools,
                                       tool_choice="required", parallel_tool_calls=False, max_tokens=200,
                                       temperature=1.0, seed=4)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "report"
    jsonschema.validate(json.loads(call.function.arguments), parameters)
    assert r.usage.prompt_tokens > 100  # the image's rows are in the prompt
