"""`tools` against a real `serve` process on the embedded model (SmolLM2, whose template knows no tools: the
documented Hermes-style fallback), with the openai client: required and named calls whose arguments
validate, streamed calls that reassemble to the calls returned whole, parallel calls, a conversation
that goes on after the tools' results, and every malformed tool request a 400 naming its field."""

from __future__ import annotations

import json

import httpx
import pytest
from tools_data import QUESTION, TIME, TOOLS, WEATHER, validate_call

TIMEOUT = 120


def ask(client, server, **kwargs):
    args = dict(model=server.model, messages=QUESTION, tools=TOOLS, max_tokens=160, temperature=1.0)
    return client.chat.completions.create(**{**args, **kwargs})


@pytest.mark.parametrize("seed", range(4))
def test_required_calls_validate(server, client, seed):
    """Free to call as often as it likes, a sampled reply may reach max_tokens in its fifth call: then the
    complete calls come back, with finish_reason length (measured here: 1 to 4 calls, always ended)."""
    r = ask(client, server, tool_choice="required", seed=seed)
    choice = r.choices[0]
    assert choice.finish_reason in ("tool_calls", "length"), choice
    assert choice.message.tool_calls and choice.message.content is None
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        validate_call(call.function.name, call.function.arguments)


@pytest.mark.parametrize("seed", range(2))
def test_a_named_function_is_the_one_called(server, client, seed):
    r = ask(client, server, tool_choice={"type": "function", "function": {"name": "get_time"}}, seed=seed,
            parallel_tool_calls=True)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1  # a named function: one call
    assert calls[0].function.name == "get_time"
    validate_call("get_time", calls[0].function.arguments)


def reassemble(chunks) -> tuple[list[dict], str | None, str]:
    """OpenAI's streamed tool-call deltas put back together: each call's id and name from its first delta,
    its arguments the concatenation of the fragments."""
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.function.name and d.type == "function", d  # the first delta names the call
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and d.function.name is None, d
            calls[d.index]["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish, content


@pytest.mark.parametrize("seed", [5, 6])
def test_streamed_calls_reassemble_to_the_calls(server, client, seed):
    """The same seed streamed and not: the same functions with the same argument text. The prompt is
    evaluated once before (see test_structured_output: whole and cached prompts differ in the last bits)."""
    ask(client, server, tool_choice="required", seed=seed, max_tokens=1)
    whole = ask(client, server, tool_choice="required", seed=seed)
    chunks = list(ask(client, server, tool_choice="required", seed=seed, stream=True))
    calls, finish, content = reassemble(chunks)
    assert finish == whole.choices[0].finish_reason in ("tool_calls", "length") and content == ""
    expected = [{"name": c.function.name, "arguments": c.function.arguments} for c in whole.choices[0].message.tool_calls]
    assert [{"name": c["name"], "arguments": c["arguments"]} for c in calls] == expected
    fragments = sum(len(c.choices[0].delta.tool_calls or []) for c in chunks if c.choices)
    assert fragments > 2 * len(calls)  # arguments arrive in pieces, not in one delta at the end


def test_parallel_calls_come_back_as_entries(server, client):
    """Asked for two cities, the model makes two calls in one reply under some seed; each is its own entry.
    With parallel_tool_calls false the same seed gives one."""
    for seed in range(40):
        r = ask(client, server, tool_choice="required", seed=seed)
        calls = r.choices[0].message.tool_calls
        if len(calls) >= 2:
            break
    else:
        pytest.fail("no seed of 40 gave two calls")
    assert len({c.id for c in calls}) == len(calls)
    for call in calls:
        validate_call(call.function.name, call.function.arguments)
    one = ask(client, server, tool_choice="required", seed=seed, parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1


def test_a_conversation_goes_on_after_the_results(server, client):
    """The model's call, the function's result as a `tool` message, and the reply that follows: text that
    uses the result (no tool may be called: tool_choice none)."""
    first = ask(client, server, tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=1)
    call = first.choices[0].message.tool_calls[0]
    args = validate_call(call.function.name, call.function.arguments)
    messages = [*QUESTION, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id,
                 "content": json.dumps({"city": args["city"], "temperature": 21, "sky": "sunny"})}]
    r = client.chat.completions.create(model=server.model, messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=60, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content.strip()
    assert "<tool_call>" not in r.choices[0].message.content
    auto = client.chat.completions.create(model=server.model, messages=messages, tools=TOOLS, max_tokens=120,
                                          temperature=0)
    for c in auto.choices[0].message.tool_calls or []:  # auto: text, or calls that validate
        validate_call(c.function.name, c.function.arguments)


def test_auto_may_answer_in_text(server, client):
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Say hello."}],
                                       tools=[TIME], max_tokens=30, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content


def post(server, **body):
    body = {"model": server.model, "messages": QUESTION, "max_tokens": 8, **body}
    return httpx.post(server.base_url + "/chat/completions", json=body, headers=server.headers(), timeout=TIMEOUT)


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
BAD = [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER], "messages": [*QUESTION, {"role": "tool", "tool_call_id": "call_9", "content": "21"}]},
     "messages.1.tool_call_id"),
    ({"tools": [WEATHER], "messages": [*QUESTION, {"role": "assistant", "tool_calls": [CALL]},
                                       {"role": "tool", "tool_call_id": "call_2", "content": "21"}]},
     "messages.2.tool_call_id"),
    ({"tools": [WEATHER], "messages": [*QUESTION, {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "get_weather", "arguments": "{not json"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
    ({"tools": [WEATHER], "response_format": {"type": "json_schema", "json_schema": {
        "name": "r", "schema": {"type": "string", "format": "hostname"}}}}, "response_format.json_schema.schema"),
]


@pytest.mark.parametrize("body, param", BAD, ids=[p for _, p in BAD])
def test_a_malformed_tool_request_is_a_400(server, body, param):
    r = post(server, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert "\n" not in err["message"]
    assert post(server, tools=[WEATHER]).status_code == 200  # and the server goes on serving


def test_the_example_agent_loop_runs(server):
    """examples/agent_loop.py against the server: its functions are called with valid arguments (they
    would raise otherwise) and the loop ends with an answer in text."""
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parents[2] / "examples" / "agent_loop.py"
    done = subprocess.run([sys.executable, str(example), "What is the weather in Oslo?", "--base-url",
                           server.base_url, "--api-key", server.api_key], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "get_weather(" in done.stderr or "multiply(" in done.stderr
    assert " -> {" in done.stderr and done.stdout.strip()
