"""The chat page reads only files uploaded to it, and makes no request of its own.

Gradio (6.31) copies any `FileData` path a client names into its cache and serves it back:
its "was this uploaded?" check (`processing_utils._check_allowed`) returns early unless
`blocks.has_launched`, which `mount_gradio_app` never sets, and it is skipped for http(s) URLs,
which it downloads instead. Gradio also reaches out on its own: run history (files a run in
a Hub bucket a request header names, with the host's HF token), `gradio_api/file=<url>`
(fetches a public URL for the client), `gradio_api/proxy=`. Here every component accepts
only files inside gradio's upload folder, run history is off, and those routes are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NOT_UPLOADED = "a file in this request was not uploaded here; clear the conversation and upload it again"
OUTBOUND_ROUTES = ("/gradio_api/file=http:", "/gradio_api/file=https:", "/gradio_api/file=//",
                   "/gradio_api/proxy=")


def upload_folder() -> str:
    from gradio.utils import get_upload_folder

    return get_upload_folder()


def is_uploaded(path: str | Path) -> bool:
    """True for a file inside gradio's upload folder once symlinks and `..` are resolved."""
    from gradio.utils import is_in_or_equal

    return not _is_url(str(path)) and is_in_or_equal(path, upload_folder())


def _is_url(path: str) -> bool:
    return "://" in path or path.startswith("//")


def accept_uploads_only(blocks) -> None:
    """Every component of `blocks` refuses a file from outside the upload folder, URLs included."""
    import gradio as gr

    def guard(block):
        gradio_move, gradio_async_move = block.move_resource_to_block_cache, block.async_move_resource_to_block_cache

        def check(path):
            if path is not None and not is_uploaded(path):
                raise gr.Error(NOT_UPLOADED)

        def move(path):
            check(path)
            return gradio_move(path)

        async def async_move(path):
            check(path)
            return await gradio_async_move(path)

        # instance attributes, not a subclass: gradio writes a .pyi stub beside every Component subclass
        block.move_resource_to_block_cache, block.async_move_resource_to_block_cache = move, async_move

    for block in blocks.blocks.values():
        if hasattr(block, "async_move_resource_to_block_cache"):
            guard(block)
    # and gradio's own check on top: it applies only to an app it believes launched
    blocks.has_launched = True


class OfflineMiddleware:
    """Refuses gradio's routes that fetch a URL on a client's behalf (403, one sentence)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not any(route in path.lower() for route in OUTBOUND_ROUTES):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": "this server fetches nothing from other hosts"}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
