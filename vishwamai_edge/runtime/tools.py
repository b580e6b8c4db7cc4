"""Tool calling: the functions a request offers, how the model's chat template writes a call, the grammar
that makes every call valid, and the parser that reads calls back out of the reply as it streams.

A model's template either knows tools (it renders a `tools` list and assistant `tool_calls`) and names
its call format, or it does not and the conversation is rewritten into the documented fallback, Hermes
style, that any chat model can follow (the embedded SmolLM2 among them): a system message lists the tools
inside `<tools></tools>` and asks for each call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
earlier calls are written that way in the assistant's turn and results come back as a user turn of
`<tool_response>` blocks.

The grammar (llguidance's Lark syntax) fixes the shape of the reply by the request's `tool_choice`:
`required` and a named function allow calls only; `auto` allows text that holds no call marker, or calls
(after some text where the format allows it); `none` allows text only. Every call is compact JSON,
`{"name": ..., "arguments": {...}}` in that order, its name one of the offered tools and its arguments
valid under that tool's `parameters` schema (the subset `constrained.py` enforces). A reply is therefore
parsed with no guessing, as it streams: its calls come out as (id, name) and then argument fragments, and
the arguments are the exact text the model wrote, streamed or not.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import InputError
from .constrained import Grammar, json_rule, prepare
from .reply import split_stop

NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, and its arguments' JSON schema."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: dict(NO_PARAMETERS))

    def for_template(self) -> dict[str, Any]:
        """As chat templates take it (OpenAI's and transformers' shape)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as the model wrote it

    def for_template(self) -> dict[str, Any]:
        """As chat templates take an earlier call: the arguments as a mapping."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments_dict()}}

    def arguments_dict(self) -> dict[str, Any]:
        try:
            value = json.loads(self.arguments)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise InputError(f"tool call {self.id!r}: arguments must be a JSON object")
        return value


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes its calls: `prefix`, then each call as `open` + JSON + `close`, calls separated by
    `sep`, then `suffix`. `args_key` names the arguments in the call's JSON; `text_before`: the reply may
    say something before its first call."""

    name: str
    prefix: str = ""
    open: str = ""
    close: str = ""
    sep: str = ""
    suffix: str = ""
    args_key: str = "arguments"
    text_before: bool = False
    parallel: bool = True  # the model's template can render several calls in one turn
    id_chars: int = 24  # Mistral's template takes ids of 9 alphanumerics only

    @property
    def trigger(self) -> str:
        """What comes before the first call's JSON."""
        return self.prefix + self.open

    @property
    def marker(self) -> str:
        """What starts the calls: the reply holds it only there (a call's own `{` where nothing comes before)."""
        return self.trigger or "{"

    def new_id(self) -> str:
        if self.id_chars == 9:
            return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
        return "call_" + secrets.token_hex(self.id_chars // 2)

    def write(self, calls: list[ToolCall]) -> str:
        """Earlier calls as the grammar has the model write them (the fallback's assistant turns)."""
        body = self.sep.join(
            self.open + json.dumps({"name": c.name, self.args_key: c.arguments_dict()}, ensure_ascii=False,
                                   separators=(",", ":")) + self.close
            for c in calls)
        return self.prefix + body + self.suffix


FORMATS = {
    # Hermes 2 Pro / Qwen2.5 and the fallback: `<tool_call>` blocks, after some text or none
    "hermes": ToolFormat("hermes", open="<tool_call>\n", close="\n</tool_call>", sep="\n", text_before=True),
    # Llama 3.1 / 3.2 / 3.3 custom tools: the reply is the call, `parameters`; the template renders one call a turn
    "llama3": ToolFormat("llama3", args_key="parameters", parallel=False),
    # Mistral (v3 tokenizer): a control token, then a JSON list of calls
    "mistral": ToolFormat("mistral", prefix="[TOOL_CALLS][", sep=",", suffix="]", id_chars=9),
}

FALLBACK_PROMPT = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}"
    "\n</tool_call>"
)


def format_for(template: str) -> tuple[ToolFormat, bool]:
    """The call format of a model's chat template and whether the template renders tools itself (native);
    a template that does not gets the Hermes-style fallback."""
    if "tools" in template:
        if "[TOOL_CALLS]" in template:
            return FORMATS["mistral"], True
        if "<tool_call>" in template:
            return FORMATS["hermes"], True
        if "ipython" in template and '"parameters"' in template:
            return FORMATS["llama3"], True
    return FORMATS["hermes"], False


Choice = Literal["auto", "none", "required"] | str  # or a function's name


@dataclass(frozen=True)
class ToolUse:
    """A request's tools, as one reply uses them: the offered functions, the choice, the format and the
    compiled grammar."""

    tools: tuple[Tool, ...]
    choice: Choice
    parallel: bool
    format: ToolFormat
    native: bool  # the chat template renders tools and calls itself
    grammar: Grammar

    def messages_for_template(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict] | None]:
        """The conversation as the template renders it, and the `tools` it takes (None: the fallback,
        where the tools are in a system message and calls and results are plain text)."""
        if self.native:
            out = []
            for m in messages:
                m = dict(m)
                if m.get("tool_calls"):
                    m["tool_calls"] = [c.for_template() for c in m["tool_calls"]]
                    m.setdefault("content", "")
                else:
                    m.pop("tool_calls", None)  # Llama's template reads the key being there as a call
                out.append(m)
            return out, [t.for_template() for t in self.tools]
        listed = "\n".join(json.dumps(t.for_template(), ensure_ascii=False) for t in self.tools)
        guide = FALLBACK_PROMPT.format(tools=listed)
        out: list[dict[str, Any]] = []
        if messages and messages[0]["role"] == "system":
            first, messages = messages[0], messages[1:]
            out.append({"role": "system", "content": f"{_text(first['content'])}\n\n{guide}"})
        else:
            out.append({"role": "system", "content": guide})
        after_tool = False  # consecutive results share one user turn
        for m in messages:
            if m["role"] == "tool":
                block = f"<tool_response>\n{_text(m['content'])}\n</tool_response>"
                if after_tool:
                    out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + block}
                else:
                    out.append({"role": "user", "content": block})
            elif m.get("tool_calls"):
                content = _text(m.get("content") or "")
                calls = self.format.write(list(m["tool_calls"]))
                out.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
            else:
                out.append({k: v for k, v in m.items() if k != "tool_calls"})
            after_tool = m["role"] == "tool"
        return out, None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if p.get("type") == "text")


Controls = Callable[[str], list[tuple[int | None, str]]]  # text -> its pieces, control tokens by id


def grammar_text(tools: tuple[Tool, ...], choice: Choice, parallel: bool, fmt: ToolFormat, controls: Controls,
                 text_schema: dict[str, Any] | None = None, text_json: bool = False) -> str:
    """The Lark grammar of a reply under `choice`. `text_schema`/`text_json`: a reply that is not a call is
    JSON (the request's response_format). `controls`: a string split at the model's control tokens. Each
    schema is checked here, once: what cannot be enforced is refused naming `tools.N.function.parameters`
    or `response_format.json_schema.schema`."""
    named = choice not in ("auto", "none", "required")
    parallel = parallel and fmt.parallel and not named

    def seq(*texts: str) -> str:
        return " ".join(f"<[{token}]>" if token is not None else json.dumps(piece)
                        for token, piece in controls("".join(texts)) if piece)

    params = [prepare(t.parameters, f"tools.{i}.function.parameters") for i, t in enumerate(tools)]
    branches = [{"type": "object", "properties": {"name": {"const": t.name}, fmt.args_key: p},
                 "required": ["name", fmt.args_key], "additionalProperties": False}
                for t, p in zip(tools, params) if not named or t.name == choice]
    # checked again as a whole: the node bound holds for all the tools together, not for each alone
    lines = [f"call: {json_rule({'anyOf': branches}, 'tools')}"]
    more = f' ({seq(fmt.close, fmt.sep, fmt.open)} call)*' if parallel else ""
    lines.append(f"rest: call{more} {seq(fmt.close, fmt.suffix)}".rstrip())
    json_text = text_json or text_schema is not None
    if choice in ("auto", "none") and json_text:  # a reply that is not a call
        lines.append(f"text: {json_rule(text_schema, 'response_format.json_schema.schema')}")
    elif choice in ("auto", "none"):
        # text never holds the marker that starts a call (a control token cannot be text anyway)
        anywhere = ".*" if fmt.text_before else ""
        marker = fmt.marker if all(token is None for token, _ in controls(fmt.marker)) else ""
        exclude = f" & ~/(?s:{anywhere}{_regex(marker)}.*)/" if marker else ""
        lines.append(f"text: TEXT\nTEXT: /(?s:.*)/{exclude}")
    head = seq(fmt.prefix, fmt.open)
    if choice == "auto" and fmt.text_before and not json_text:  # (such a format's marker is text: Hermes)
        # lazy: the text ends where the first marker does, so the calls after it are constrained
        lines.append(f"head[lazy]: /(?s:.*){_regex(fmt.trigger)}/")
        head = "head"
    calls = f"{head} rest"
    start = {"none": "text", "auto": f"text | {calls}"}.get(choice, calls)
    return f"start: {start}\n" + "\n".join(lines) + "\n"


def _regex(text: str) -> str:
    """`text` matched literally inside a Lark /regex/."""
    return "".join(f"\\{c}" if c in "\\.^$|?*+()[]{}/-" else "\\n" if c == "\n" else c for c in text)


# -- reading calls back --------------------------------------------------------------------
@dataclass
class CallEvent:
    """Something the reply said: text, a call's start (its id and name), or a fragment of its arguments."""

    kind: Literal["text", "call", "arguments"]
    text: str = ""
    index: int = 0
    id: str = ""


class CallParser:
    """A reply's text in, as it streams; its text and calls out as `CallEvent`s. The grammar guarantees the
    shape; the parser only has to find where each part ends."""

    def __init__(self, use: ToolUse):
        self.fmt = use.format
        self.parallel = use.parallel and use.format.parallel and use.choice in ("auto", "required")
        self.buf = ""
        self.pos = 0  # what is consumed
        self.state = "start"  # start -> text | calls: name -> args -> close -> (name | done)
        self._calls: list[ToolCall] = []
        self._complete = 0  # calls whose arguments have ended
        self._args: list[str] = []
        self._depth = 0
        self._in_string = self._escaped = False
        self._text: list[str] = []

    @property
    def calls(self) -> list[ToolCall]:
        """The complete calls so far (one cut off by the length limit is not among them)."""
        return self._calls[:self._complete]

    @property
    def content(self) -> str | None:
        """The reply's text: all of it without calls; with calls, what came before them (None: nothing)."""
        text = "".join(self._text)
        return (text.strip() or None) if self.calls else text

    def feed(self, piece: str) -> list[CallEvent]:
        self.buf += piece
        return self._advance(final=False)

    def finish(self) -> list[CallEvent]:
        """The end of the reply: text still held back comes out; a call cut short (length) is dropped."""
        return self._advance(final=True)

    def _text_event(self, text: str) -> list[CallEvent]:
        if not text:
            return []
        self._text.append(text)
        return [CallEvent("text", text)]

    def _advance(self, final: bool) -> list[CallEvent]:
        events: list[CallEvent] = []
        marker = self.fmt.marker
        while True:
            rest = self.buf[self.pos:]
            if self.state == "text":
                self.pos = len(self.buf)
                return events + self._text_event(rest)
            if self.state == "start":  # text that may end in the marker's first characters is held back
                safe, _, found = split_stop(rest, [marker])
                if found and (not safe or self.fmt.text_before):
                    events += self._text_event(safe)
                    self.pos += len(safe) + len(self.fmt.trigger)
                    self.state = "name"
                    continue
                if not self.fmt.text_before:
                    if final or not marker.startswith(rest):
                        self.state = "text"
                        continue
                    return events
                safe = rest if final else safe
                events += self._text_event(safe)
                self.pos += len(safe)
                return events
            if self.state == "name":
                m = re.match(r'\{"name":"([^"]*)","' + re.escape(self.fmt.args_key) + '":', rest)
                if m is None:
                    return events
                call = ToolCall(self.fmt.new_id(), m.group(1), "")
                self._calls.append(call)
                self._args = []
                self._depth, self._in_string, self._escaped = 0, False, False
                events.append(CallEvent("call", call.name, len(self._calls) - 1, call.id))
                self.pos += m.end()
                self.state = "args"
                continue
            if self.state == "args":
                end = self._scan(rest)
                fragment = rest if end is None else rest[:end]
                if fragment:
                    self._args.append(fragment)
                    events.append(CallEvent("arguments", fragment, len(self._calls) - 1))
                self.pos += len(fragment)
                if end is None:
                    return events
                last = self._calls[-1]
                self._calls[-1] = ToolCall(last.id, last.name, "".join(self._args))
                self._complete += 1
                self.state = "close"
                continue
            if self.state == "close":  # `}` of the call, then the close, and a separator and open or the end
                again = "}" + self.fmt.close + self.fmt.sep + self.fmt.open if self.parallel else None
                done = "}" + self.fmt.close + self.fmt.suffix
                if again is not None and rest.startswith(again):
                    self.pos += len(again)
                    self.state = "name"
                    continue
                if rest.startswith(done) and (final or again is None or not again.startswith(rest)):
                    self.pos += len(done)
                    self.state = "done"
                    continue
                return events
            return events  # done: the grammar allows nothing after the calls

    def _scan(self, text: str) -> int | None:
        """Where the arguments object ends in `text` (the index after its `}`), None if not in it yet."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None


def parse_tool_choice(choice: Any, tools: tuple[Tool, ...]) -> Choice:
    """OpenAI's `tool_choice` (a string, or {"type": "function", "function": {"name"}}) checked against
    the tools; a name that is not one of them is refused."""
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise InputError(f"tool_choice must be 'auto', 'none', 'required' or a function, not {choice!r}")
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise InputError('tool_choice names a function as {"type": "function", "function": {"name": ...}}')
    if name not in {t.name for t in tools}:
        raise InputError(f"tool_choice names {name!r}, which is not among the tools "
                         f"({', '.join(t.name for t in tools)})")
    return name
