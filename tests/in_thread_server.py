"""An ASGI app served by a real uvicorn on 127.0.0.1, in a thread of the test process."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Yields http://127.0.0.1:PORT once the server accepts connections; stops it afterwards."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server thread died")
        thread.join(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def launched_ui(engine, max_file_mb: float, retrieval=None) -> Iterator[str]:
    """The Gradio page on `engine` (answering from `retrieval`'s index when given), launched in this process;
    yields its URL (ending in /)."""
    from vishwamai_edge.ui.app import launch_ui

    port = free_port()
    blocks = launch_ui(engine, "127.0.0.1", port, max_file_mb=max_file_mb, prevent_thread_lock=True, quiet=True,
                       retrieval=retrieval)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        blocks.close()
