"""`vishwamai-edge serve`: load a bundle once, answer the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import UserError, require
from ..runtime.engine import Engine
from ..runtime.options import RuntimeOptions
from ..web.listen import check_port_free, is_loopback

API_KEY_ENV = "VISHWAMAI_EDGE_API_KEY"


def run_server(
    bundle: Path,
    options: RuntimeOptions,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_queue: int = 16,
    max_request_mb: float = 20,
    with_ui: bool = False,
    max_file_mb: float = 10,
    docs: Path | str | None = None,
    top_k: int = 3,
) -> None:
    from .app import create_app

    uvicorn = require("uvicorn", "ui")
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if max_request_mb <= 0:
        raise UserError("--max-request-mb must be positive")
    check_port_free(host, port)
    if not is_loopback(host) and api_key is None:
        print(f"warning: serving on {host} without an API key: anyone who can reach this port can use the model "
              f"(set --api-key or {API_KEY_ENV})", file=sys.stderr)
    engine = Engine.load(bundle, options, max_queue=max_queue)
    note = engine.pipeline.speculative.note if engine.pipeline.speculative is not None else None
    if note:
        print(f"note: {note}", file=sys.stderr)
    if engine.speculative != "off":
        print("note: replies with response_format or tools decode without speculation (drafts are not checked "
              "against their grammar)", file=sys.stderr)
    retrieval = None
    try:
        if docs is not None:
            from ..runtime.retrieval import Retrieval

            retrieval = Retrieval.open(docs, engine.pipeline, top_k)  # an index of another model fails here
        app = create_app(engine, api_key=api_key, max_body_bytes=int(max_request_mb * 1024 * 1024), host=host,
                         retrieval=retrieval)
        if with_ui:
            from ..ui.app import mount_ui

            mount_ui(app, engine, "/ui", max_file_mb, retrieval)  # same engine: one model in memory for both
        print(f"serving {engine.model_id} on http://{host}:{port}/v1 ({engine.parallel} slots of {engine.n_ctx} "
              "tokens)" + (f" (speculative decoding: {engine.speculative})" if engine.speculative != "off" else "")
              + (" (UI at /ui)" if with_ui else ""),
              file=sys.stderr, flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        if retrieval is not None:
            retrieval.close()
        engine.close()
