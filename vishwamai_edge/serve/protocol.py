"""OpenAI's chat-completions wire format: requests in, responses, stream chunks and errors out.

Only what the runtime can honour is accepted; a field it cannot (n > 1, logprobs, the
legacy `functions`) is refused with a 400 that names it rather than silently ignored.
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

from ..runtime.tools import NO_PARAMETERS, CallEvent, CallParser, Tool, ToolCall, ToolUse, parse_tool_choice

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


class FunctionCallIn(_Model):
    name: str
    arguments: str  # a JSON object, as OpenAI sends it


class ToolCallIn(_Model):
    id: str = Field(min_length=1, max_length=64)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class FunctionDef(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: Any = None  # checked by runtime/constrained.py, which names what is wrong
    strict: bool | None = None  # the parameters are enforced whether or not it is set


class ToolIn(_Model):
    type: Literal["function"]
    function: FunctionDef


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


# Known fields the runtime cannot honour: refused by name (`functions` is the legacy spelling of `tools`).
UNSUPPORTED = ("functions", "function_call", "logit_bias")


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
    tools: list[ToolIn] | None = None
    tool_choice: Any = None  # "auto" | "none" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool | None = None
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
            hint = {"functions": " (use tools)", "function_call": " (use tool_choice)"}.get(name, "")
            raise APIError(400, f"{name} is not supported by this server{hint}", param=name)
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
    _check_tools(req)
    return req


def _check_tools(req: ChatCompletionRequest) -> None:
    """Tools and the conversation's calls and results, each fault a 400 naming its field."""
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: two functions have the same name", param="tools")
    if req.tool_choice is not None:
        if not req.tools:
            raise APIError(400, "tool_choice is set but no tools are given", param="tool_choice")
        try:
            parse_tool_choice(req.tool_choice, tuple(Tool(n) for n in names))
        except InputError as exc:
            raise APIError(400, str(exc), param="tool_choice") from None
    open_calls: set[str] = set()
    for i, msg in enumerate(req.messages):
        if msg.tool_calls and msg.role != "assistant":
            raise APIError(400, f"messages.{i}.tool_calls: only assistant messages make calls",
                           param=f"messages.{i}.tool_calls")
        for j, call in enumerate(msg.tool_calls or []):
            where = f"messages.{i}.tool_calls.{j}.function.arguments"
            try:
                ToolCall(call.id, call.function.name, call.function.arguments).arguments_dict()
            except InputError:
                raise APIError(400, f"{where}: must be a JSON object", param=where) from None
            open_calls.add(call.id)
        if msg.role == "tool":
            if msg.tool_call_id not in open_calls:
                where = f"messages.{i}.tool_call_id"
                raise APIError(400, f"{where}: {msg.tool_call_id!r} answers no earlier tool call", param=where)
            open_calls.discard(msg.tool_call_id)
        elif msg.tool_call_id is not None:
            raise APIError(400, f"messages.{i}.tool_call_id: only tool messages answer calls",
                           param=f"messages.{i}.tool_call_id")


def to_chat_request(req: ChatCompletionRequest, defaults: RuntimeDefaults, budget: MediaBudget,
                    compile_schema: Callable[[Any, str], Grammar], tool_use: Callable[..., ToolUse]) -> ChatRequest:
    """Decode every part (images and audio too, so bad data is a 400) within the request's media
    budget, which also refuses kinds the bundle cannot encode before decoding them, and compile the
    response format's schema and the tools' grammar (what cannot be enforced is a 400); may block:
    run it off the event loop."""
    messages = []
    for i, msg in enumerate(req.messages):
        role = "system" if msg.role == "developer" else msg.role
        parts = tuple(_parts(msg.content, f"messages.{i}.content", budget))
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls or ())
        messages.append(Message(role, parts, calls, msg.tool_call_id))
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
        grammar=None if req.tools else _grammar(req.response_format, compile_schema),
        tools=_tool_use(req, tool_use) if req.tools else None,
    )


def _tool_use(req: ChatCompletionRequest, tool_use: Callable[..., ToolUse]) -> ToolUse:
    """The request's tools compiled with its choice and response format (what a reply that is no call is); a
    schema that cannot be enforced is a 400 whose param is the field its message names."""
    tools = tuple(Tool(t.function.name, t.function.description,
                       NO_PARAMETERS if t.function.parameters is None else t.function.parameters)
                  for t in req.tools or ())
    rf = req.response_format
    text_schema = rf.json_schema.schema_ if rf is not None and rf.type == "json_schema" and rf.json_schema else None
    try:
        return tool_use(tools, parse_tool_choice(req.tool_choice, tools), req.parallel_tool_calls is not False,
                        text_schema, rf is not None and rf.type == "json_object")
    except InputError as exc:
        param = str(exc).split(":")[0] if str(exc).startswith(("tools", "response_format")) else "tools"
        raise APIError(400, str(exc), param=param) from None


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

    def response(self, message: dict[str, Any], finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        return {
            **self._base("chat.completion"),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
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


class ReplyShape:
    """A reply's text pieces as OpenAI shapes them: content, or with tools, content and `tool_calls`,
    streamed as deltas (a call's id and name first, then fragments of its arguments) or whole. Both come
    from one parser, so a streamed call reassembles to exactly the call returned whole."""

    def __init__(self, tools: ToolUse | None):
        self.parser = CallParser(tools) if tools is not None else None
        self.text: list[str] = []

    def deltas(self, piece: str) -> list[dict[str, Any]]:
        if self.parser is None:
            self.text.append(piece)
            return [{"content": piece}] if piece else []
        return [_delta(e) for e in self.parser.feed(piece)]

    def end(self) -> list[dict[str, Any]]:
        return [] if self.parser is None else [_delta(e) for e in self.parser.finish()]

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.parser is not None and self.parser.calls and reason == "stop" else reason

    def message(self) -> dict[str, Any]:
        if self.parser is None:
            return {"role": "assistant", "content": "".join(self.text), "refusal": None}
        out: dict[str, Any] = {"role": "assistant", "content": self.parser.content, "refusal": None}
        if self.parser.calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in self.parser.calls]
        return out


def _delta(event: CallEvent) -> dict[str, Any]:
    if event.kind == "text":
        return {"content": event.text}
    if event.kind == "call":
        return {"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                "function": {"name": event.text, "arguments": ""}}]}
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# -- /v1/embeddings ----------------------------------------------------------------------------
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit per request


class EmbeddingsRequest(_Model):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


def parse_embeddings(data: Any) -> list[str]:
    """The texts of a /v1/embeddings body (and its model and format, validated); 400s name the field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    if "dimensions" in data:
        raise APIError(400, "dimensions is not supported: this model's vectors have one size", param="dimensions")
    try:
        req = EmbeddingsRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(x) for x in first["loc"][:1])
        msg = "a string or a list of strings (token ids are not taken)" if param == "input" else first["msg"]
        raise APIError(400, f"{param}: {msg}", param=param) from None
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts or len(texts) > MAX_EMBEDDING_INPUTS:
        raise APIError(400, f"input: 1 to {MAX_EMBEDDING_INPUTS} texts", param="input")
    if any(not t.strip() for t in texts):
        raise APIError(400, "input: an empty text has no embedding", param="input")
    return texts


def embeddings_response(vectors: Any, model: str, encoding_format: str, tokens: int) -> dict[str, Any]:
    import base64

    import numpy as np

    def encoded(v: Any) -> Any:
        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() if encoding_format == "base64" \
            else [float(x) for x in v]

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
