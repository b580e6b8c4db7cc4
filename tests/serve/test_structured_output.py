"""`response_format` against a real `serve` process on the embedded model, with the openai client: replies
that parse and validate (the jsonschema library is the judge, formats included), the same reply streamed
and not, and every schema that cannot be enforced refused with a 400 naming it."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from schemas import PROMPTS, SCHEMAS

TIMEOUT = 120


def schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def validate(text: str, schema: dict) -> None:
    """Valid JSON under `schema` as the 2020-12 validator reads it, formats checked by its own checker."""
    cls = jsonschema.Draft202012Validator
    cls(schema, format_checker=cls.FORMAT_CHECKER).validate(json.loads(text))


def test_json_object(server, client):
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Describe a cat."}],
                                       response_format={"type": "json_object"}, max_tokens=200, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize("name", ["person", "event"])
def test_streamed_reply_equals_the_reply(server, client, name):
    """At temperature 1.0 with a seed: both parse, validate (formats too) and are the same text. The prompt
    is evaluated once before: on this Q4_K_M file a prompt evaluated whole and one taken from the slot's
    cache give logits that differ in the last bits, enough to change a draw at temperature 1."""
    args = dict(model=server.model, messages=[{"role": "user", "content": PROMPTS[name]}], max_tokens=300,
                temperature=1.0, seed=11, response_format=schema_format(name, SCHEMAS[name]))
    client.chat.completions.create(**{**args, "max_tokens": 1})
    whole = client.chat.completions.create(**args)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True)
              if c.choices]
    assert whole.choices[0].finish_reason == "stop"
    validate(whole.choices[0].message.content, SCHEMAS[name])
    assert "".join(pieces) == whole.choices[0].message.content and len(pieces) > 3


BAD = [
    ({"type": "array", "uniqueItems": True}, "keyword 'uniqueItems' at #"),
    ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "keyword 'not' at #/properties/a"),
    ({"type": "string", "format": "hostname"}, "format 'hostname'"),
    ({"type": "strin"}, "#/type must name JSON types"),
    ({"type": "object", "required": "a"}, "#/required must be a list"),
    ({"$ref": "#/$defs/missing"}, "points at nothing"),
    ({"$ref": "https://example.com/s.json"}, "only references inside the schema"),
    ({"type": "string", "pattern": "^(?=a)b$"}, "look-around"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum (5) is greater than maximum (2)"),
    ([1, 2], "a JSON schema is an object"),
    (json.loads('{"items": ' * 500 + "{}" + "}" * 500), "nested deeper than 64 levels"),  # no 500, no crash
]


@pytest.mark.parametrize("schema, message", BAD)
def test_a_schema_that_cannot_be_enforced_is_a_400(server, schema, message):
    body = {"model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    r = httpx.post(server.base_url + "/chat/completions", json=body, headers=server.headers(), timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"
    assert err["param"] == "response_format.json_schema.schema"
    assert "\n" not in err["message"]


def test_response_format_shapes_are_checked(server, client):
    for fmt, param in (({"type": "json_schema"}, "response_format.json_schema.schema"),
                       ({"type": "xml"}, "response_format.type"),
                       ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
                        "response_format.json_schema.name")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, response_format=fmt)
        assert exc.value.param == param, exc.value.message
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Say hi."}],
                                       max_tokens=4)
    assert r.choices[0].message.content  # the server goes on serving
