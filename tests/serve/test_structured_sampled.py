"""Every schema of tests/serve/schemas.py (between them every enforced keyword), 20 replies each sampled at
temperature 1.0 with seeds 0-19, four at a time through a real `serve` process with four slots (each slot
decoding under its own grammar), with the openai client: every reply ends, parses and validates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from schemas import PROMPTS, SCHEMAS
from serve_process import LiveServer, start_server, stop_server

pytestmark = pytest.mark.slow
SEEDS = range(20)


@pytest.fixture(scope="module")
def four_slots(embedded_bundle, tmp_path_factory) -> Iterator[LiveServer]:
    live = start_server(embedded_bundle, tmp_path_factory.mktemp("serve-json") / "server.log", "--parallel", "4")
    yield live
    stop_server(live)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_twenty_sampled_replies_validate(four_slots, name):
    from openai import OpenAI

    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    with OpenAI(base_url=four_slots.base_url, api_key="none", max_retries=0, timeout=600) as client:
        def one(seed: int):
            r = client.chat.completions.create(model=four_slots.model, messages=[{"role": "user", "content": PROMPTS[name]}],
                                               max_tokens=400, temperature=1.0, seed=seed, response_format=fmt)
            return r.choices[0]

        with ThreadPoolExecutor(4) as pool:
            choices = list(pool.map(one, SEEDS))
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    for seed, choice in zip(SEEDS, choices):
        assert choice.finish_reason == "stop", (seed, choice.message.content[-200:])
        validator.validate(json.loads(choice.message.content))
    assert len({c.message.content for c in choices}) >= 10  # sampled: the seeds give different replies


def test_sampled_tool_calls_in_four_slots_validate(four_slots):
    """20 sampled replies under tool_choice required, four at a time: each slot's call grammar its own,
    every call valid against its function's parameters. One call each (parallel_tool_calls false): at
    temperature 1.0 a reply free to go on calling can reach max_tokens first."""
    from openai import OpenAI
    from tools_data import QUESTION, TOOLS, validate_call

    with OpenAI(base_url=four_slots.base_url, api_key="none", max_retries=0, timeout=600) as client:
        def one(seed: int):
            return client.chat.completions.create(model=four_slots.model, messages=QUESTION, tools=TOOLS,
                                                  tool_choice="required", parallel_tool_calls=False,
                                                  max_tokens=200, temperature=1.0, seed=seed).choices[0]

        with ThreadPoolExecutor(4) as pool:
            choices = list(pool.map(one, SEEDS))
    assert all(c.finish_reason == "tool_calls" for c in choices), [c.finish_reason for c in choices]
    for c in choices:
        (call,) = c.message.tool_calls
        validate_call(call.function.name, call.function.arguments)
