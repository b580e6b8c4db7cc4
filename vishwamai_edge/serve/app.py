"""The OpenAI-compatible HTTP API on one shared `Engine`.

Routes: POST /v1/chat/completions (JSON or SSE), POST /v1/audio/transcriptions (bundles with a
speech encoder), POST /v1/embeddings (bundles with an embedding model), GET /v1/models, GET /health.
What the device heard in a request's audio parts comes back beside the answer as `vishwamai_edge.heard` (in the first chunk when streaming).
With an API key, every route (and anything mounted later, such as the web UI) needs it.
A request's status is decided before any byte is sent: the handler waits for the
first piece of the reply, so a prompt over the context is a 400, not a broken stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError, UserError
from ..runtime.engine import Engine, Generation
from ..runtime.media import audio_part
from ..web.hosts import HostCheckMiddleware, allowed_hosts
from ..web.limits import BodyLimitMiddleware
from .auth import APIKeyMiddleware
from .protocol import (
    APIError,
    Completion,
    ReplyShape,
    api_error_for,
    embeddings_response,
    parse_embeddings,
    parse_request,
    to_chat_request,
    usage,
)

log = logging.getLogger("vishwamai_edge.serve")

DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024  # room for a few base64 images
POLL_S = 0.5  # how often a waiting request checks that its client is still there
# Requests whose media are decoded at once (up to 192 MB of pixels each); the rest wait their turn,
# and each checks the queue has room before it decodes anything.
DECODE_AT_ONCE = 2
KEEPALIVE_S = 10.0
# Tokens one /v1/embeddings request may hold (about 2 s of all-MiniLM-L6-v2 on 2 cores); OpenAI's own cap is higher,
# but on a device one request must not keep the model for minutes.
MAX_EMBEDDING_TOKENS = 32_768


def create_app(engine: Engine, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               host: str = "127.0.0.1", retrieval: Any = None) -> FastAPI:
    """`host`: the address the server is bound to; on loopback only loopback Host headers pass. `retrieval`
    (runtime.retrieval.Retrieval): chat requests with `"docs": true` are answered from its index."""
    # No /docs: FastAPI's docs page loads its scripts from a CDN, and this server is offline.
    app = FastAPI(title="vishwamai-edge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    if api_key is not None:
        if not api_key.strip():
            raise UserError("the API key is empty; give a non-empty --api-key or unset it")
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    # every API body counted as it arrives (a chunked upload included); the UI mounted at /ui has its own limits
    app.add_middleware(BodyLimitMiddleware, limit_for=lambda path: max_body_bytes if path.startswith("/v1/") else None)
    allowed = allowed_hosts(host)
    if allowed is not None:  # added last: the outermost check, before the key is even looked at
        app.add_middleware(HostCheckMiddleware, allowed=allowed)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        err = api_error_for(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_id, "n_ctx": engine.n_ctx, "queue": engine.status()}

    v1 = APIRouter(prefix="/v1")
    decoding = asyncio.Semaphore(DECODE_AT_ONCE)
    embedding = asyncio.Semaphore(1)  # /v1/embeddings requests run one at a time

    def model_card(model_id: str) -> dict[str, Any]:
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": "vishwamai-edge"}
        if engine.model_ids[model_id] is not None:  # a LoRA adapter on the bundle's model
            card["parent"] = engine.model_id
        return card

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in engine.model_ids]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in engine.model_ids:
            raise _unknown_model(model_id, engine)
        return model_card(model_id)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(_json_body(await _read_body(request, max_body_bytes)))
        if req.model not in engine.model_ids:
            raise _unknown_model(req.model, engine)
        async with decoding:
            try:
                engine.check_room()
            except Exception as exc:
                raise api_error_for(exc) from None
            chat = await run_in_threadpool(to_chat_request, req, engine.defaults, engine.media_budget(),
                                          engine.compile_schema, engine.tool_use)
        chat = replace(chat, adapter=engine.model_ids[req.model])
        hits = None
        if (req.model_extra or {}).get("docs") is not None:
            chat, hits = await _with_sources(chat, req.model_extra["docs"], retrieval)
        try:
            gen = engine.submit(chat)
        except Exception as exc:
            raise api_error_for(exc) from None
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        completion = Completion(req.model, include_usage)
        pieces = gen.astream(idle_s=POLL_S)
        try:
            first = await _first_piece(pieces, request)
        except BaseException as exc:
            gen.cancel()
            await pieces.aclose()
            if isinstance(exc, Exception):
                raise api_error_for(exc) from None
            raise
        extra = {"vishwamai_edge": {"heard": gen.heard}} if gen.heard else {}
        if hits is not None:  # streamed: what was retrieved; whole: also which of them the reply used
            extra.setdefault("vishwamai_edge", {})["sources"] = _sources(hits, None)
        shape = ReplyShape(chat.tools)
        if req.stream:
            return StreamingResponse(
                _sse(gen, pieces, first, completion, shape, extra),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            shape.deltas(first or "")
            checked = time.monotonic()
            async for piece in pieces:
                if piece is not None:
                    shape.deltas(piece)
                if time.monotonic() - checked >= POLL_S:  # pieces may never pause: check on the clock
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise _Disconnected()
        finally:
            gen.cancel()  # no-op when finished; stops the model when the client has gone
        shape.end()
        stats = gen.stats.generation
        if hits is not None:
            extra["vishwamai_edge"]["sources"] = _sources(hits, shape.message().get("content") or "")
        return {**completion.response(shape.message(), shape.finish_reason(stats.finish_reason),
                                      usage(stats.prompt_tokens, stats.completion_tokens)), **extra}

    @v1.post("/audio/transcriptions")
    async def transcriptions(request: Request):
        """OpenAI's speech-to-text route: multipart `file` (+ `model`, `response_format` json|text)."""
        if "audio" not in engine.encoders:
            raise APIError(400, "this bundle has no audio encoder; build one with a speech section",
                           code="unsupported_input")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(413, f"the request body is over the limit of {max_body_bytes // (1024 * 1024)} MiB",
                           code="request_too_large")
        try:
            form = await request.form(max_files=1, max_fields=8, max_part_size=max_body_bytes)
        except Exception as exc:  # a body that is no multipart form
            raise APIError(400, f"the request must be multipart/form-data with a 'file' ({exc})") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "no 'file' part: send the audio as multipart field 'file'", param="file")
        fmt = str(form.get("response_format") or "json")
        if fmt not in ("json", "text"):
            raise APIError(400, f"response_format {fmt!r} is not supported (json, text)", param="response_format")
        data = await upload.read()
        try:
            async with decoding:
                part = await run_in_threadpool(audio_part, data, engine.media_budget())
            text = await run_in_threadpool(engine.pipeline.transcribe, part.samples, part.sample_rate)
        except InputError as exc:
            raise APIError(400, f"file: {exc}", param="file", code="invalid_audio") from None
        if fmt == "text":
            return PlainTextResponse(text)
        return {"text": text}

    @v1.post("/embeddings")
    async def embeddings(request: Request):
        """OpenAI's embeddings route, on the bundle's sentence-embedding model (`encoders.embedding`)."""
        embedder = engine.encoders.get("embedding")
        if embedder is None:
            raise APIError(400, "this bundle has no embedding model; build one with an embeddings section",
                           code="unsupported_input")
        data = _json_body(await _read_body(request, max_body_bytes))
        texts = parse_embeddings(data)
        name = (embedder.contract.get("source") or {}).get("name")
        if data["model"] not in (*engine.model_ids, name):
            raise APIError(404, f"the model {data['model']!r} does not exist here; embeddings come from {name!r}",
                           param="model", code="model_not_found")
        def embed() -> tuple[Any, int]:
            ids = embedder.ids_for(texts, "input", MAX_EMBEDDING_TOKENS)  # tokenized once, checked, then embedded
            return embedder.embed_ids(ids), sum(map(len, ids))

        try:
            async with embedding:  # its own turn: a long request never holds up the chat requests' decoding
                vectors, tokens = await run_in_threadpool(embed)
        except InputError as exc:
            raise APIError(400, f"input: {exc}", param="input") from None
        return embeddings_response(vectors, name or data["model"], data.get("encoding_format") or "float", tokens)

    app.include_router(v1)
    return app


class _Disconnected(APIError):
    def __init__(self) -> None:
        super().__init__(499, "the client closed the request", code="client_closed_request")


async def _with_sources(chat: Any, docs: Any, retrieval: Any) -> tuple[Any, list]:
    """The request with the sources for its last user message at the head of its system turn."""
    from ..runtime.engine import Message
    from ..runtime.media import TextPart

    if docs is not True:
        raise APIError(400, "docs: true or absent", param="docs")
    if retrieval is None:
        raise APIError(400, "docs: this server has no document index; start it with serve --docs INDEX",
                       param="docs")
    users = [m for m in chat.messages if m.role == "user"]
    question = " ".join(p.text for p in users[-1].parts if isinstance(p, TextPart)).strip() if users else ""
    if not question:
        raise APIError(400, "docs: the last user message has no text to look up", param="docs")
    system = " ".join(p.text for m in chat.messages if m.role == "system" for p in m.parts
                      if isinstance(p, TextPart)) or None
    try:
        text, hits = await run_in_threadpool(retrieval.ask, question, system)
    except InputError as exc:
        raise APIError(400, f"docs: {exc}", param="docs") from None
    rest = tuple(m for m in chat.messages if m.role != "system")
    return replace(chat, messages=(Message.text("system", text), *rest)), hits


def _sources(hits: list, reply: str | None) -> list[dict[str, Any]]:
    from ..runtime.retrieval import used_sources

    used = {n for n, _ in used_sources(reply, hits)[1]} if reply is not None else set()
    return [{"n": i, "file": h.path, "page": h.page, "heading": h.heading, "score": round(h.score, 4),
             **({"used": i in used} if reply is not None else {})} for i, h in enumerate(hits, 1)]


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})") from None
    except RecursionError:  # [[[[... deeper than Python's parser goes
        raise APIError(400, "the request body's JSON is nested too deeply") from None


def _unknown_model(name: str, engine: Engine) -> APIError:
    served = ", ".join(repr(m) for m in engine.model_ids)
    return APIError(404, f"the model {name!r} does not exist here; this server serves {served}",
                    param="model", code="model_not_found")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    too_big = APIError(413, f"the request body is over the limit of {limit // (1024 * 1024)} MiB",
                       code="request_too_large")
    if declared.isdigit() and int(declared) > 8 * limit:
        raise too_big  # not worth draining: the connection is closed after the answer
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        # past the limit, keep reading and dropping, so the client gets to read the 413
    if size > limit:
        raise too_big
    return b"".join(chunks)


async def _first_piece(pieces: AsyncIterator[str | None], request: Request) -> str | None:
    """Wait for the reply's first piece (None: an empty reply), watching for a client that left."""
    async for piece in pieces:
        if piece is not None:
            return piece
        if await request.is_disconnected():
            raise _Disconnected()
    return None


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(gen: Generation, pieces: AsyncIterator[str | None], first: str | None,
               completion: Completion, shape: ReplyShape, extra: dict[str, Any] | None = None) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk, content (and tool-call) chunks, a finish chunk, [usage], [DONE]."""
    try:
        yield _event({**completion.chunk({"role": "assistant", "content": ""}), **(extra or {})})
        for delta in shape.deltas(first or ""):
            yield _event(completion.chunk(delta))
        if first is not None:
            idle = 0.0
            async for piece in pieces:
                if piece is None:
                    idle += POLL_S
                    if idle >= KEEPALIVE_S:  # a comment line: clients ignore it, proxies keep the stream
                        idle = 0.0
                        yield ": keep-alive\n\n"
                    continue
                idle = 0.0
                for delta in shape.deltas(piece):
                    yield _event(completion.chunk(delta))
        for delta in shape.end():
            yield _event(completion.chunk(delta))
        stats = gen.stats.generation
        yield _event(completion.chunk({}, shape.finish_reason(stats.finish_reason)))
        if completion.include_usage:
            yield _event(completion.usage_chunk(usage(stats.prompt_tokens, stats.completion_tokens)))
        yield "data: [DONE]\n\n"
    except Exception as exc:  # after the headers an error can only travel as an event
        log.exception("error while streaming")
        yield _event(api_error_for(exc).body())
    finally:
        gen.cancel()  # a client that disconnected lands here (cancelled); stop the model
        await pieces.aclose()
