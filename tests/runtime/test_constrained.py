"""Constrained replies (runtime/constrained.py): the keyword check, the schema as compiled (references unrolled,
exact date and time patterns), and, drawn by hypothesis from the supported subset, schemas whose every
finished reply the jsonschema library validates, through the shipped SmolLM2."""

from __future__ import annotations

import datetime
import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vishwamai_edge.errors import InputError
from vishwamai_edge.runtime.constrained import FORMAT_PATTERNS, MAX_REF_DEPTH, bounded, check_schema

WORDS = ["red", "green", "blue", "north", "south", "alpha", "beta", "seven"]
KEYS = ["name", "size", "kind", "items", "when", "ok"]
VALIDATOR = jsonschema.Draft202012Validator


def valid(value, schema) -> bool:
    return VALIDATOR(schema, format_checker=VALIDATOR.FORMAT_CHECKER).is_valid(value)


def test_what_cannot_be_enforced_is_named():
    for schema, message in [({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}},
                             "keyword 'uniqueItems' at #/properties/a"),
                            ({"anyOf": [{"type": "string"}, {"if": {}}]}, "keyword 'if' at #/anyOf/1"),
                            ({"$defs": {"x": {"multipleOf": 2}}}, "keyword 'multipleOf' at #/$defs/x"),
                            ({"type": ["string", "date"]}, "must name JSON types"),
                            ({"format": "uri"}, "format 'uri'")]:
        with pytest.raises(InputError, match=re.escape(message)):
            check_schema(schema, "response_format")
    check_schema({"title": "t", "description": "d", "type": "object", "examples": [{}], "$comment": "c"}, "x")


def test_recursion_is_unrolled_a_bounded_number_of_levels():
    tree = {"$ref": "#/$defs/node", "$defs": {"node": {
        "type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}}
    out, depth = bounded(tree, "x"), 0
    node = out
    while node is not False:
        depth += 1
        node = node["properties"]["children"]["items"]
    assert depth == MAX_REF_DEPTH and "$defs" not in out and "$ref" not in json.dumps(out)
    nested = {"a": {"children": [{"children": [{"children": [{"children": []}]}]}]}}["a"]
    assert valid(nested, out) and valid(nested, tree)
    too_deep = {"children": [nested]}
    assert valid(too_deep, tree) and not valid(too_deep, out)  # tighter than the schema, never looser
    root = bounded({"type": "object", "properties": {"next": {"anyOf": [{"type": "null"}, {"$ref": "#"}]}}}, "x")
    assert json.dumps(root).count('"null"') == MAX_REF_DEPTH + 1


def test_dates_and_times_as_exact_patterns():
    """Every string the patterns allow is a date (time) that Python and jsonschema read; the patterns
    leave out only February 29, years before 1000, and second fractions over nine digits."""
    date = re.compile(FORMAT_PATTERNS["date"])
    for day in range(366):
        d = datetime.date(2023, 1, 1) + datetime.timedelta(days=day)
        assert date.match(d.isoformat())
    for month in range(1, 13):
        for day in range(29, 33):
            text = f"2024-{month:02d}-{day:02d}"
            if date.match(text):
                datetime.date.fromisoformat(text)
    assert not date.match("2024-02-29") and not date.match("0999-01-01") and not date.match("2024-13-01")
    time = re.compile(FORMAT_PATTERNS["time"])
    for text in ("23:59:59Z", "00:00:00.123456789+05:30", "12:30:00-11:00"):
        assert time.match(text) and valid(text, {"format": "time"})
    for text in ("24:00:00Z", "12:30:00", "12:30:00.1234567890Z", "12:60:00Z"):
        assert not time.match(text)
    assert re.match(FORMAT_PATTERNS["date-time"], "2024-06-30T12:30:00.5Z")


# -- drawn schemas through the real model ----------------------------------------------------
LEAVES = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 100)),
    st.builds(lambda hi: {"type": "number", "exclusiveMinimum": 0, "maximum": hi}, st.integers(1, 100)),
    st.builds(lambda lo, extra: {"type": "string", "minLength": lo, "maxLength": lo + extra},
              st.integers(0, 3), st.integers(1, 12)),
    st.just({"type": "boolean"}),
    st.just({"type": ["string", "null"], "maxLength": 8}),
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=4, unique=True).map(lambda xs: {"enum": xs}),
    st.sampled_from(WORDS).map(lambda w: {"const": w}),
    st.sampled_from(["date", "time", "date-time", "uuid"]).map(lambda f: {"type": "string", "format": f}),
    st.just({"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"}),
)


def _object(props: dict) -> dict:
    """Closed, as OpenAI's strict schemas are: an open object lets a sampled reply add properties without
    end (the schema allows it), which says nothing about the constraint."""
    return {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}


SCHEMAS = st.recursive(LEAVES, lambda inner: st.one_of(
    st.builds(_object, st.dictionaries(st.sampled_from(KEYS), inner, min_size=1, max_size=3)),
    st.builds(lambda item, lo, span: {"type": "array", "items": item, "minItems": lo, "maxItems": lo + span},
              inner, st.integers(0, 2), st.integers(0, 2)),
    st.lists(inner, min_size=2, max_size=3).map(lambda xs: {"anyOf": xs}),
), max_leaves=6)


def _top(value: dict, recursive: bool) -> dict:
    """An object at the top, sometimes a linked list of them through a recursive $ref."""
    if not recursive:
        return {"type": "object", "properties": {"value": value}, "required": ["value"], "additionalProperties": False}
    return {"$ref": "#/$defs/node", "$defs": {"node": {
        "type": "object", "properties": {"value": value, "next": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/node"}]}},
        "required": ["value", "next"], "additionalProperties": False}}}


@pytest.mark.slow
def test_drawn_schemas_give_valid_replies(embedded_bundle):
    from vishwamai_edge.runtime.backends import SamplingParams
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(embedded_bundle, RuntimeOptions(n_ctx=2048, n_threads=2, parallel=1))
    finished: list[bool] = []

    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(value=SCHEMAS, recursive=st.booleans(), seed=st.integers(0, 2**31 - 1))
    def replies_validate(value, recursive, seed):
        schema = _top(value, recursive)
        session = pipeline.session(grammar=pipeline.compile_schema(schema), max_tokens=400,
                                   sampling=SamplingParams(temperature=1.0, seed=seed))
        reply = "".join(session.ask("Fill in this JSON."))
        finished.append(session.last_stats.finish_reason == "stop")
        if finished[-1]:
            assert valid(json.loads(reply), schema), (reply, schema)

    try:
        replies_validate()
    finally:
        pipeline.close()
    assert sum(finished) >= 0.9 * len(finished), f"{sum(finished)} of {len(finished)} replies ended"


def test_a_failed_grammar_ends_its_reply_and_the_slots_go_on(embedded_bundle):
    """A reply whose grammar stops accepting (here made to, after a few tokens) fails alone, in one line;
    the reply decoded beside it in another slot and the next request are answered."""
    from vishwamai_edge.runtime.constrained import GrammarError
    from vishwamai_edge.runtime.engine import ChatRequest, Engine, Message
    from vishwamai_edge.runtime.options import RuntimeOptions

    class FailingGrammar:
        def __init__(self, grammar):
            self.grammar = grammar

        def start(self):
            state, taken = self.grammar.start(), []

            def accept(token: int) -> None:
                taken.append(token)
                if len(taken) > 3:
                    raise GrammarError("the reply's schema could not be followed: made to fail")

            state.accept = accept
            return state

    engine = Engine.load(embedded_bundle, RuntimeOptions(n_threads=1, parallel=2), max_queue=4)
    try:
        grammar = FailingGrammar(engine.compile_schema({"type": "object"}))
        ask = (Message.text("user", "Describe a cat in JSON."),)
        failing = engine.submit(ChatRequest(ask, max_tokens=40, grammar=grammar))
        beside = engine.submit(ChatRequest((Message.text("user", "Say hi."),), max_tokens=8))
        with pytest.raises(GrammarError, match="made to fail"):
            failing.text()
        assert beside.text()
        assert engine.submit(ChatRequest((Message.text("user", "Say hi."),), max_tokens=4)).text()
    finally:
        engine.close()
