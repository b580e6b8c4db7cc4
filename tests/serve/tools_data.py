"""Functions offered in the tool-calling tests (closed objects, an enum and bounds: the arguments must
keep to them) and the conversation they are offered in."""

from __future__ import annotations

import json

import jsonschema

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 30},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city, as hours and minutes.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 30},
                           "hours": {"type": "integer", "minimum": 0, "maximum": 23}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris and in Rome right now?"}]


def validate_call(name: str, arguments: str) -> dict:
    """The call names an offered function and its arguments validate against that function's parameters."""
    assert name in PARAMETERS, name
    args = json.loads(arguments)
    jsonschema.Draft202012Validator(PARAMETERS[name]).validate(args)
    return args
