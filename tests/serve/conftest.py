"""A real `vishwamai-edge serve` process on 127.0.0.1 with the embedded model, once per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from serve_process import LiveServer, start_server, stop_server

API_KEY = "sk-test-0123456789"
MAX_REQUEST_MB = 1


@pytest.fixture(scope="module")
def server(embedded_bundle, tmp_path_factory) -> Iterator[LiveServer]:
    """API key from the environment (the --api-key flag's other spelling), a 1 MiB body limit."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # One slot: these tests compare each greedy reply with itself alone, and this Q4_K_M bundle's batched
    # rows differ from single rows in the last bits (tests/serve/test_batching.py says where); batching
    # is tested there, on the shipped Q4_1 file whose batched rows are exact.
    live = start_server(embedded_bundle, log, "--max-request-mb", str(MAX_REQUEST_MB), "--max-queue", "32",
                        "--parallel", "1", env={"VISHWAMAI_EDGE_API_KEY": API_KEY})
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    # no retries: a failure must show, not be papered over
    with OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=120) as c:
        yield c


# -- a vision-language bundle (tests/vlm_bundles.py builds it once per session) -------------
from vlm_bundles import vlm_bundle  # noqa: E402,F401


@pytest.fixture(scope="module")
def vlm_server(vlm_bundle, tmp_path_factory) -> Iterator[LiveServer]:
    """`serve` on the tiny LLaVA bundle, no API key, the default body limit."""
    live = start_server(vlm_bundle, tmp_path_factory.mktemp("serve-vlm") / "server.log")
    yield live
    stop_server(live)
