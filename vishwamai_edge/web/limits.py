"""A byte limit on every request body, counted as it arrives, chunked or not.

Starlette's `max_part_size` does not bound a multipart form's file parts, and a body sent
without a Content-Length (chunked) is not bounded by anything the routes check first: the
transcription route and gradio's upload route read it all. This middleware counts the bytes
the app receives; past the limit the app is told the client left (so it stops reading and
answering) and the client gets a 413. A declared Content-Length over the limit is refused
before a byte is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def too_large(limit: int) -> str:
    return f"the request body is over the limit of {limit / 2**20:g} MiB"


class BodyLimitMiddleware:
    """`limit_for(path)`: the byte limit for a request to `path`, None for none."""

    def __init__(self, app: Any, limit_for: Callable[[str], int | None]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        limit = self.limit_for(scope.get("path", "")) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(send, limit)
            return
        seen, over, started = 0, False, False

        async def counted_receive() -> dict[str, Any]:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True  # the app stops reading, as if the client had gone
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to the "disconnect"; ours goes out instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            # the rest of the body is not read: the server closes the connection after this answer
            await _refuse(send, limit)


async def _refuse(send: Any, limit: int) -> None:
    body = json.dumps({"error": {"message": too_large(limit), "type": "invalid_request_error", "param": None,
                                 "code": "request_too_large"}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
