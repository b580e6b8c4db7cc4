"""DNS-rebinding protection: requests must name this server by an address it is bound to.

A web page on evil.example can make its own name resolve to 127.0.0.1 and then send the
victim's browser at this server; the browser still says `Host: evil.example`. On a loopback
bind only loopback names are accepted. Binding elsewhere (`--host 0.0.0.0`, a LAN address)
is the user opening the server deliberately, and its names are not known here: no check then.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from .listen import is_loopback

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def allowed_hosts(bind: str) -> frozenset[str] | None:
    """The Host names a server bound to `bind` answers; None when any name is allowed."""
    if not is_loopback(bind):
        return None
    return LOOPBACK_NAMES | {bind.lower().strip("[]")}


def host_name(header: str) -> str:
    """`name:port`, `[v6]:port`, `name` -> the bare lower-case name."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    name, sep, port = header.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name
    try:  # a bare IPv6 address without brackets
        return str(ipaddress.ip_address(header))
    except ValueError:
        return header  # anything else is compared whole, so it matches no allowed name


class HostCheckMiddleware:
    """Answers 400 to an HTTP request (closes a websocket) whose Host is not one of `allowed`."""

    def __init__(self, app: Any, allowed: frozenset[str]):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), None)
        # no Host at all (HTTP/1.0 tools) is no browser, so no rebinding: let it through
        if header is None or host_name(header) in self.allowed:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        message = (f"the Host header {header[:100]!r} does not name this server; use "
                   f"{' or '.join(sorted(self.allowed))} (serve with --host to open it to other names)")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": "invalid_host"}}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
