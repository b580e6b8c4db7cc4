"""OpenAI's chat-completions wire format: requests in, responses, stream chunks and errors out.

Only what the runtime can honour is accepted; a field it cannot (tools, n > 1,
logprobs) is refused with a 400 that names it rather than silently ignored.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ContextOverflowError, InputError, UserError
from ..runtime.backends import SamplingParams
from ..runtime.engine import ChatRequest, EngineBusyError, EngineClosedError, EngineFailedError, Message
from ..runtime.manifest import RuntimeDefaults
from ..runtime.media import (
    MediaBudget,
    Part,
    TextPart,
    UnsupportedInputError,
    audio_part,
    decode_base64,
    decode_data_url,
    image_part,
)

if TYPE_CHECKING:
    from ..runtime.constrained import Grammar


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error_for(exc: BaseException) -> APIError:
    """Map a library error to its HTTP answer; anything unexpected is a 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, UnsupportedInputError):
        return APIError(400, str(exc), param="messages", code="unsupported_input")
    if isinstance(exc, InputError):
        return APIError(400, str(exc), param="messages")
    if isinstance(exc, (EngineBusyError, EngineClosedError)):
        return APIError(503, str(exc), type_="server_error", code="overloaded")
    if isinstance(exc, EngineFailedError):
        return APIError(500, f"{exc}; restart the server (see its log)", type_="server_error")
    if isinstance(exc, UserError):
        return APIError(400, str(exc))
    return APIError(500, f"internal error ({type(exc).__name__}); see the server log", type_="server_error")


# -- requests -----------------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextContent(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str
    detail: str | None = None


class ImageContent(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Model):
    data: str  # base64
    format: str = "wav"


class AudioContent(_Model):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[Union[TextContent, ImageContent, AudioContent], Field(discriminator="type")]


class ChatMessageIn(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None


class StreamOptions(_Model):
    include_usage: bool = False


class JsonSchemaFormat(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: Any = Field(None, alias="schema")  # checked by runtime/constrained.py, which names what is wrong
    description: str | None = None
    strict: bool | None = None  # the schema is enforced whether or not it is set


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# Known fields the runtime cannot honour: refused by name.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logit_bias")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    # llama.cpp's multiplicative penalty, an extension that llama.cpp's own server also accepts
    repeat_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    n: int = 1
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


def parse_request(data: Any) -> ChatCompletionRequest:
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(x) for x in first["loc"])
        raise APIError(400, f"{param}: {first['msg']}", param=param) from None
    for name in UNSUPPORTED:
        if (req.model_extra or {}).get(name) not in (None, [], {}):
            raise APIError(400, f"{name} is not supported by this server", param=name)
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if req.logprobs:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    if req.top_logprobs is not None:
        raise APIError(400, "top_logprobs is not supported by this server", param="top_logprobs")
    rf = req.response_format
    if rf is not None and rf.type == "json_schema" and (rf.json_schema is None or rf.json_schema.schema_ is None):
        raise APIError(400, "response_format.json_schema.schema: required for type json_schema",
                       param="response_format.json_schema.schema")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
    return req


def to_chat_request(req: ChatCompletionRequest, defaults: RuntimeDefaults, budget: MediaBudget,
                    compile_schema: Callable[[Any, str], Grammar]) -> ChatRequest:
    """Decode every part (images and audio too, so bad data is a 400) within the request's media
    budget, which also refuses kinds the bundle cannot encode before decoding them, and compile the
    response format's schema (what cannot be enforced is a 400); may block: run it off the event loop."""
    messages = []
    for i, msg in enumerate(req.messages):
        role = "system" if msg.role == "developer" else msg.role
        parts = tuple(_parts(msg.content, f"messages.{i}.content", budget))
        messages.append(Message(role, parts))
    temperature = req.temperature if req.temperature is not None else defaults.temperature
    base = SamplingParams()
    sampling = SamplingParams(
        temperature=temperature,
        top_p=req.top_p if req.top_p is not None else base.top_p,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        repeat_penalty=req.repeat_penalty if req.repeat_penalty is not None else base.repeat_penalty,
        # like OpenAI: without a seed, sampled answers vary from request to request
        seed=req.seed if req.seed is not None else secrets.randbits(32),
    )
    return ChatRequest(
        messages=tuple(messages),
        max_tokens=req.max_completion_tokens or req.max_tokens or defaults.max_tokens,
        sampling=sampling,
        stop=tuple([req.stop] if isinstance(req.stop, str) else req.stop or ()),
        grammar=_grammar(req.response_format, compile_schema),
    )


def _grammar(rf: ResponseFormat | None, compile_schema: Callable[[Any, str], Grammar]) -> Grammar | None:
    if rf is None or rf.type == "text":
        return None
    where = "response_format" if rf.type == "json_object" else "response_format.json_schema.schema"
    try:
        return compile_schema(None if rf.json_schema is None or rf.type == "json_object" else rf.json_schema.schema_,
                              where)
    except InputError as exc:
        raise APIError(400, str(exc), param=where) from None


def _parts(content: str | list[Any] | None, where: str, budget: MediaBudget) -> list[Part]:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextPart(content)]
    parts: list[Part] = []
    for j, item in enumerate(content):
        param = f"{where}.{j}"
        try:
            if isinstance(item, TextContent):
                parts.append(TextPart(item.text))
            elif isinstance(item, ImageContent):
                budget.require("image")
                parts.append(image_part(decode_data_url(item.image_url.url, "image"), budget))
            else:
                budget.require("audio")
                fmt = item.input_audio.format.lower()
                if fmt not in ("wav", "mp3", "flac", "ogg"):
                    raise InputError(f"audio format {fmt!r} is not supported (wav, mp3, flac, ogg)")
                parts.append(audio_part(decode_base64(item.input_audio.data, "audio"), budget))
        except UnsupportedInputError as exc:
            raise APIError(400, f"{param}: {exc}", param=param, code="unsupported_input") from None
        except InputError as exc:
            code = {"image_url": "invalid_image", "input_audio": "invalid_audio"}.get(item.type)
            raise APIError(400, f"{param}: {exc}", param=param, code=code) from None
    return parts


# -- responses ----------------------------------------------------------------------------
class Completion:
    """Ids and timestamps shared by one completion's response or chunks."""

    def __init__(self, model: str, include_usage: bool = False):
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def response(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        return {
            **self._base("chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage,
        }

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        out = {**self._base("chat.completion.chunk"),
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
