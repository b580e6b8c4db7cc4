"""Constrained replies: a JSON schema enforced token by token, so every reply that ends parses and validates.

The schema is compiled by llguidance (the structured-generation engine llama.cpp itself offers as its
`LLAMA_LLGUIDANCE` option) into a matcher over this model's vocabulary; before each token is drawn the
matcher's mask sets every token that cannot continue a valid reply to -inf in the logits that llama.cpp's
sampler then reads, and the drawn token advances the matcher. When the JSON value is complete only the end
of generation is allowed. Why not llama-cpp-python's own JSON-schema-to-GBNF converter: it drops keywords
it cannot express (integer bounds among them) without a word; llguidance enforces more of the schema and
refuses what it cannot.

What is enforced is a stated subset (SUPPORTED, FORMATS); a schema using any other keyword is refused in
one line naming the keyword and where it is (a 400 on the API), never silently loosened. `oneOf` is
enforced as `anyOf`: a reply matches at least one branch (branches that exclude each other, such as
different types or `const` tags, make that the same thing).
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, require

JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
SUPPORTED = frozenset({
    "type", "properties", "required", "additionalProperties", "enum", "const", "anyOf", "oneOf", "allOf",
    "$ref", "$defs", "definitions", "items", "prefixItems", "minItems", "maxItems", "minLength", "maxLength",
    "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
})
ANNOTATIONS = frozenset({  # say nothing about which values are valid
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
    "writeOnly",
})
FORMATS = ("date-time", "date", "time", "uuid", "email")
# RFC 3339 as exact patterns, tighter than the grammar engine's own: a day that exists in every year of its
# month (no February 29), years 1000-9999 and at most nine digits of a second's fraction. A sampled reply
# cannot run on through endless fraction digits, and every reply is a date Python's datetime reads.
_DATE = (r"[1-9][0-9]{3}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
         r"|02-(0[1-9]|1[0-9]|2[0-8]))")
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
FORMAT_PATTERNS = {"date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}T{_TIME}$"}
# A recursive $ref is unrolled this many levels deep; below, the recursive branch is `false` (an array of
# such items must be empty there): a sampled reply cannot nest without end, and each still validates.
MAX_REF_DEPTH = 4
MAX_SCHEMA_NODES = 20_000  # after unrolling: a schema that grows past this is refused, not compiled
MAX_SCHEMA_DEPTH = 64  # nesting: deeper is refused before Python's recursion limit could turn it into a 500
ANY_OBJECT: dict[str, Any] = {"type": "object"}  # response_format json_object
# Replies are compact JSON (no free whitespace between tokens): a sampled model cannot wander off into
# endless newlines before the value is done, and the reply costs fewer tokens.
COMPACT = {"whitespace_flexible": False}


class GrammarError(InputError):
    """A reply's grammar stopped accepting (a schema past the grammar engine's limits): that reply ends."""


def read_schema_file(path: Path) -> Any:
    """A JSON schema from a file, refused in one line when the file is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise InputError(f"{path} is not a JSON file") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None


def check_schema(schema: Any, where: str) -> None:
    """Refuse a schema that uses a keyword this runtime cannot enforce, naming it and its place."""
    if not isinstance(schema, dict):
        raise InputError(f"{where}: a JSON schema is an object, not {type(schema).__name__}")
    _check(schema, where, "#", 0)


def _check(node: Any, where: str, path: str, depth: int) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise InputError(f"{where}: the schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(node, bool):
        return  # true / false: anything / nothing
    if not isinstance(node, dict):
        raise InputError(f"{where}: {path} is not a schema (an object or a boolean)")
    for key, value in node.items():
        if key in ANNOTATIONS:
            continue
        if key not in SUPPORTED:
            raise InputError(f"{where}: keyword {key!r} at {path} cannot be enforced while decoding; "
                             f"supported: {', '.join(sorted(SUPPORTED))}")
        here = f"{path}/{key}"
        if key == "type":
            types = value if isinstance(value, list) else [value]
            if not types or any(t not in JSON_TYPES for t in types):
                raise InputError(f"{where}: {here} must name JSON types ({', '.join(JSON_TYPES)}), not {value!r}")
        elif key == "format" and value not in FORMATS:
            raise InputError(f"{where}: format {value!r} at {path} cannot be enforced while decoding; "
                             f"supported: {', '.join(FORMATS)}")
        elif key in ("properties", "$defs", "definitions"):
            if not isinstance(value, dict):
                raise InputError(f"{where}: {here} must be an object of schemas")
            for name, sub in value.items():
                _check(sub, where, f"{here}/{name}", depth + 1)
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if not isinstance(value, list) or not value:
                raise InputError(f"{where}: {here} must be a non-empty list of schemas")
            for i, sub in enumerate(value):
                _check(sub, where, f"{here}/{i}", depth + 1)
        elif key in ("items", "additionalProperties"):
            _check(value, where, here, depth + 1)
        elif key == "required" and not (isinstance(value, list) and all(isinstance(x, str) for x in value)):
            raise InputError(f"{where}: {here} must be a list of property names")
        elif key == "enum" and not (isinstance(value, list) and value):
            raise InputError(f"{where}: {here} must be a non-empty list")


def bounded(schema: dict[str, Any], where: str) -> dict[str, Any]:
    """The schema as it is compiled: local `$ref`s inlined (recursion MAX_REF_DEPTH levels deep), dates and
    times as exact patterns. Every value valid under the result is valid under `schema`."""
    nodes = 0

    def resolve(ref: str) -> Any:
        if ref != "#" and not ref.startswith("#/"):
            raise InputError(f"{where}: $ref {ref!r}: only references inside the schema (#/...) are followed")
        node: Any = schema
        for part in [p.replace("~1", "/").replace("~0", "~") for p in ref[2:].split("/")] if ref != "#" else []:
            if not isinstance(node, dict) or part not in node:
                raise InputError(f"{where}: $ref {ref!r} points at nothing")
            node = node[part]
        return node

    def walk(node: Any, refs: tuple[str, ...]) -> Any:
        nonlocal nodes
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise InputError(f"{where}: the schema is over {MAX_SCHEMA_NODES} nodes with its references unrolled")
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            ref = node["$ref"]
            if refs.count(ref) >= MAX_REF_DEPTH:
                return False
            target = walk(resolve(ref), (*refs, ref))
            rest = {k: v for k, v in node.items() if k not in ("$ref", "$defs", "definitions") and k not in ANNOTATIONS}
            return {"allOf": [target, walk(rest, refs)]} if rest else target
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in ("$defs", "definitions"):
                continue  # inlined where referenced
            if key == "properties":
                out[key] = {name: walk(sub, refs) for name, sub in value.items()}
            elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
                out[key] = [walk(sub, refs) for sub in value]
            elif key in ("items", "additionalProperties"):
                out[key] = walk(value, refs)
            else:
                out[key] = value
        if out.get("format") in FORMAT_PATTERNS and "pattern" not in out:
            out["pattern"] = FORMAT_PATTERNS[out.pop("format")]
        return out

    return walk(schema, ())


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint, shared by every reply that asks for it; `start` gives one reply its state."""

    text: str  # llguidance's grammar
    tokenizer: Any = field(repr=False)

    def start(self) -> GrammarState:
        return GrammarState(self)


class GrammarState:
    """One reply's position in its grammar: masks the logits before a draw, advances on the drawn token."""

    def __init__(self, grammar: Grammar):
        llg = require("llguidance", "runtime")
        self.matcher = llg.LLMatcher(grammar.tokenizer, grammar.text)
        self._words = np.empty((grammar.tokenizer.vocab_size + 31) // 32, dtype=np.int32)

    def mask(self, logits: np.ndarray) -> None:
        """Set the logits of every token that cannot come next to -inf (in place)."""
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        allowed = np.unpackbits(self._words.view(np.uint8), bitorder="little", count=logits.shape[-1])
        logits[allowed == 0] = -np.inf

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the reply's schema could not be followed: {_one_line(self.matcher.get_error())}")

    @property
    def done(self) -> bool:
        return bool(self.matcher.is_stopped())


class Compiler:
    """Schemas -> grammars for one loaded model (its vocabulary read once, on first use)."""

    def __init__(self, llm: Any):
        self.llm = llm
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                require("llguidance", "runtime")
                from llguidance.llamacpp import lltokenizer_from_vocab

                with warnings.catch_warnings():  # it reads each token's attributes by a name llama.cpp deprecated
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._tokenizer = lltokenizer_from_vocab(self.llm.vocab_pointer)
            return self._tokenizer

    def compile(self, schema: dict[str, Any] | None, where: str) -> Grammar:
        """`schema` (None: any JSON object) checked and compiled; what cannot be enforced is refused."""
        return self.compile_lark(f"start: {json_rule(schema, where)}\n", where)

    def compile_lark(self, lark: str, where: str) -> Grammar:
        """A grammar in llguidance's Lark syntax (JSON values as `%json` rules, `json_rule`) compiled."""
        llg = require("llguidance", "runtime")
        try:
            text = llg.LLMatcher.grammar_from_lark(lark)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{where}: {_one_line(exc)}") from None
        failed, messages = llg.LLMatcher.validate_grammar_with_warnings(text, self.tokenizer())
        if failed:
            raise InputError(f"{where}: {_lark_error(messages[0]) if messages else 'the schema does not compile'}")
        return Grammar(text, self.tokenizer())

    def controls(self, text: str) -> list[tuple[int | None, str]]:
        """`text` in pieces: each control token of the model's vocabulary it spells (`[TOOL_CALLS]`) by its
        id, the text between with None; a grammar names a control token by id, never as text."""
        specials = sorted((s for s in self.llm.special_texts() if s and s in text), key=len, reverse=True)
        if not specials:
            return [(None, text)]
        out: list[tuple[int | None, str]] = []
        for i, piece in enumerate(re.split("(" + "|".join(map(re.escape, specials)) + ")", text)):
            if i % 2:
                ids = self.llm.tokenize(piece, add_special=False, parse_special=True)
                out.append((ids[0], piece) if len(ids) == 1 else (None, piece))
            elif piece:
                out.append((None, piece))
        return out


def json_rule(schema: dict[str, Any] | None, where: str) -> str:
    """`schema` (None: any JSON object) checked and bounded, as the body of a Lark rule: `%json {...}`, compact."""
    return "%json " + json.dumps({**prepare(ANY_OBJECT if schema is None else schema, where), "x-guidance": COMPACT},
                                 ensure_ascii=False)


def prepare(schema: Any, where: str) -> dict[str, Any]:
    """`schema` checked (what cannot be enforced is refused) and bounded: self-contained, ready to nest."""
    check_schema(schema, where)
    return bounded(schema, where)


def _lark_error(message: Any) -> str:
    """llguidance's error for a Lark grammar, without its position and the grammar it quotes (which holds
    the whole schema): `at 1(8): failed to compile JSON schema: <why>\n   1 | start: ...`."""
    lines = []
    for line in str(message).splitlines():
        if re.match(r"\s*\d+ \| ", line):
            break
        lines.append(line)
    return re.sub(r"^at \d+\(\d+\): ", "", _one_line("\n".join(lines)))


def _one_line(message: Any) -> str:
    """llguidance's messages (a regex error spans lines) as one line."""
    return " ".join(str(message).split())
