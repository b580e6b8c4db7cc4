"""The API key, checked on every route the server exposes (the web UI mounted in it too).

A pure ASGI middleware in front of the whole app, so no route, mounted sub-application,
static file, upload or queue endpoint can be reached without the key. Programs send
`Authorization: Bearer KEY`; a browser opening the web UI is asked for the key by its
own login prompt (HTTP Basic, the key as the password, any user name), and then sends
it with every request the page makes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Any

REALM = "vishwamai-edge"


def presented_key(authorization: str) -> str | None:
    """The key in an Authorization header value (Bearer KEY, or Basic with the key as password)."""
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            _, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return None
        return password if sep and password else None
    return None


class APIKeyMiddleware:
    """Answers 401 to any HTTP request (and closes any websocket) that lacks the key."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self._key = api_key.encode()

    def _allowed(self, scope: dict[str, Any]) -> tuple[bool, str]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        header = headers.get("authorization", "")
        if not header:
            return False, "no API key given: send it as 'Authorization: Bearer <key>'"
        key = presented_key(header)
        if key is None or not hmac.compare_digest(key.encode(), self._key):
            return False, "incorrect API key"
        return True, ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        ok, message = self._allowed(scope)
        if ok:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()
        # Basic: a browser then asks for the key itself; API clients ignore the challenge
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"www-authenticate", f'Basic realm="{REALM}", charset="UTF-8"'.encode())]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
