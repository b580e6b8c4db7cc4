"""JSON schemas that between them use every keyword constrained decoding enforces (runtime/constrained.py)."""

from __future__ import annotations

SCHEMAS: dict[str, dict] = {
    "person": {  # nested objects, required, additionalProperties, string and integer bounds, pattern
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string", "maxLength": 40},
                               "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "address"],
        "additionalProperties": False,
    },
    "order": {  # arrays with bounds, enum, const, number bounds, boolean
        "type": "object",
        "properties": {
            "kind": {"const": "order"},
            "items": {"type": "array", "minItems": 1, "maxItems": 3,
                      "items": {"enum": ["apple", "pear", "plum", "fig"]}},
            "quantities": {"type": "array", "maxItems": 4, "items": {"type": "integer", "minimum": 1, "maximum": 9}},
            "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
            "paid": {"type": "boolean"},
        },
        "required": ["kind", "items", "quantities", "price", "paid"],
        "additionalProperties": False,
    },
    "shape": {  # anyOf and oneOf (branches told apart by const), null in a type list
        "type": "object",
        "properties": {
            "shape": {"oneOf": [
                {"type": "object", "properties": {"kind": {"const": "circle"},
                                                  "radius": {"type": "integer", "minimum": 1, "maximum": 50}},
                 "required": ["kind", "radius"], "additionalProperties": False},
                {"type": "object", "properties": {"kind": {"const": "square"},
                                                  "side": {"type": "integer", "minimum": 1, "maximum": 50}},
                 "required": ["kind", "side"], "additionalProperties": False},
            ]},
            "label": {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "integer", "minimum": 0, "maximum": 99}]},
            "note": {"type": ["string", "null"], "maxLength": 20},
        },
        "required": ["shape", "label", "note"],
        "additionalProperties": False,
    },
    "tree": {  # $ref and $defs, recursive
        "$ref": "#/$defs/node",
        "$defs": {"node": {
            "type": "object",
            "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 10},
                           "children": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node"}}},
            "required": ["name", "children"],
            "additionalProperties": False,
        }},
    },
    "event": {  # formats, prefixItems, allOf, annotations
        "title": "An event",
        "type": "object",
        "allOf": [{"required": ["id"]}],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "day": {"type": "string", "format": "date", "description": "when"},
            "start": {"type": "string", "format": "time"},
            "created": {"type": "string", "format": "date-time"},
            "pair": {"type": "array", "prefixItems": [{"type": "string", "maxLength": 8}, {"type": "integer", "minimum": 0,
                                                                                          "maximum": 9}],
                     "minItems": 2, "maxItems": 2},
        },
        "required": ["id", "day", "start", "created", "pair"],
        "additionalProperties": False,
    },
}

PROMPTS = {
    "person": "Make up a person with a name, an age and an address, as JSON.",
    "order": "Write a fruit order as JSON.",
    "shape": "Describe a shape as JSON.",
    "tree": "Give a small family tree as JSON.",
    "event": "Describe a meeting as JSON.",
}
