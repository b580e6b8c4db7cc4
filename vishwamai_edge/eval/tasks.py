"""Task accuracy for `eval --tasks FILE.jsonl`: one question a line, scored in each bundle's own runtime.

    {"question": "What is 7 times 6?", "answer": "42"}                        exact match
    {"question": "Name a primary colour.", "answer": ["red", "blue"], "match": "contains"}
    {"question": "What is 27 + 48?", "answer": "75", "match": "number"}
    {"question": "Which is a fruit?", "choices": ["a brick", "a pear"], "answer": "a pear"}
    {"question": "What colour is the shape?", "image": "images/1.png", "answer": "red", "match": "contains"}
    {"question": "A person as JSON.", "schema": {"type": "object", "required": ["name"]}}    schema

- exact: the greedy reply, normalized (case, spacing, punctuation at the ends), equals an answer.
- contains: an answer appears in the normalized reply as whole words.
- number: the last number in the reply equals the answer (a number), as GRPO's `answer` reward judges it.
- choices (multiple choice): no generation; each choice is scored by its log-likelihood after the chat
  prompt (the sum over its tokens, as lm-evaluation-harness's `acc`), the highest one is the pick.
  `answer` is the right choice's text or its index.
- schema: the reply, decoded under the schema (`"constrained": false`: free, to see whether the model
  follows a format it is asked for), is right when it ends, parses and validates (jsonschema judges).
An image (a path relative to the tasks file) goes through the bundle's image encoder, before the question.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import InputError, UserError, require
from ..fsutil import jsonl_objects
from ..runtime.backends import SupportsScoring
from ..runtime.constrained import check_schema
from ..runtime.media import read_image
from ..runtime.pipeline import Pipeline
from .answers import is_number, normalize, number_matches
from .scoring import log_softmax

Match = Literal["exact", "contains", "number", "choice", "schema"]
MATCHES = ("exact", "contains", "number")
KEYS = {"id", "question", "answer", "choices", "match", "image", "schema", "constrained"}
MAX_ANSWER_TOKENS = 64  # a reply longer than this is no short answer
MAX_JSON_TOKENS = 512


@dataclass(frozen=True)
class Task:
    where: str  # FILE:LINE, for messages
    id: str
    question: str
    answers: tuple[str, ...]
    match: Match
    choices: tuple[str, ...] = ()
    image: Path | None = None
    schema: dict[str, Any] | None = None
    constrained: bool = True


@dataclass
class TaskScores:
    """Per task: the reply (or the picked choice) and whether it was right."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        by_match: dict[str, list[bool]] = {}
        for row in self.rows:
            by_match.setdefault(row["match"], []).append(row["right"])
        right = [r["right"] for r in self.rows]
        return {"tasks": len(right), "right": sum(right), "accuracy": sum(right) / max(len(right), 1),
                "by_match": {m: {"tasks": len(v), "right": sum(v), "accuracy": sum(v) / len(v)}
                             for m, v in sorted(by_match.items())}}


def read_tasks(path: Path) -> list[Task]:
    """The tasks of a JSONL file, each line checked: a wrong line is refused in one message naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise InputError(f"{path} is not a UTF-8 JSONL file") from None
    tasks = [_task(f"{path}:{n}", row, path.parent) for n, row in jsonl_objects(text, path, InputError)]
    if not tasks:
        raise InputError(f"{path} has no task lines")
    return tasks


def _task(where: str, row: dict[str, Any], base: Path) -> Task:
    unknown = sorted(set(row) - KEYS)
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(KEYS))})")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"{where}: no question (a non-empty string)")
    image = base / row["image"] if isinstance(row.get("image"), str) else None
    if "image" in row and image is None:
        raise InputError(f"{where}: image is a path relative to the tasks file")
    task_id = str(row.get("id", where.rsplit(":", 1)[1]))
    if "schema" in row:
        return _schema_task(where, task_id, question, row, image)
    if "answer" not in row:
        raise InputError(f"{where}: no answer; every task line names its answer (or a schema)")
    answer, choices = row["answer"], row.get("choices")
    if choices is not None:
        return _choice_task(where, task_id, question, answer, choices, row.get("match"), image)
    answers = [answer] if isinstance(answer, str) else answer
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise InputError(f"{where}: answer is a non-empty string or a list of them")
    match = row.get("match", "exact")
    if match not in MATCHES:
        raise InputError(f"{where}: match is one of {', '.join(MATCHES)} (or give choices), not {match!r}")
    if match == "number" and not all(is_number(a) for a in answers):
        raise InputError(f"{where}: match number needs answers that are numbers")
    return Task(where, task_id, question, tuple(answers), match, image=image)


def _schema_task(where: str, task_id: str, question: str, row: dict[str, Any], image: Path | None) -> Task:
    extra = sorted({"answer", "choices", "match"} & set(row))
    if extra:
        raise InputError(f"{where}: a schema task is judged by its schema; leave out {extra[0]!r}")
    constrained = row.get("constrained", True)
    if not isinstance(constrained, bool):
        raise InputError(f"{where}: constrained is true or false")
    check_schema(row["schema"], f"{where}: schema")  # what decoding cannot enforce, before any scoring
    return Task(where, task_id, question, (), "schema", image=image, schema=row["schema"], constrained=constrained)


def _choice_task(where: str, task_id: str, question: str, answer: Any, choices: Any, match: Any,
                 image: Path | None) -> Task:
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip()
                                                                    for c in choices):
        raise InputError(f"{where}: choices is a list of two or more non-empty strings")
    if match not in (None, "choice"):
        raise InputError(f"{where}: a task with choices is scored by likelihood; leave out match {match!r}")
    if image is not None:
        raise InputError(f"{where}: multiple choice with an image is not supported; ask it with answer and "
                         "match instead")
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise InputError(f"{where}: answer is the right choice's text or its index")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise InputError(f"{where}: answer {answer} is no index of the {len(choices)} choices")
        answer = choices[answer]
    if answer not in choices:
        raise InputError(f"{where}: answer {answer!r} is not one of the choices")
    return Task(where, task_id, question, (answer,), "choice", tuple(choices))


def is_right(task: Task, reply: str) -> bool:
    if task.match == "number":
        return any(number_matches(reply, a) for a in task.answers)
    said = normalize(reply)
    if task.match == "exact":
        return any(said == normalize(a) for a in task.answers)
    return any(re.search(rf"(?<!\w){re.escape(normalize(a))}(?!\w)", said) for a in task.answers)


def run_tasks(pipeline: Pipeline, tasks: list[Task], on_task=None) -> TaskScores:
    """Every task through one bundle: a fresh conversation each, greedy replies."""
    scores = TaskScores()
    if any(t.match == "choice" for t in tasks) and not isinstance(pipeline.llm, SupportsScoring):
        raise UserError(f"{pipeline.bundle.root}: multiple-choice tasks score each choice's likelihood, which this "
                        "bundle's backend cannot; use llama.cpp bundles, or tasks with answer and match")
    for task in tasks:
        if task.match == "schema":
            row = _schema_reply(pipeline, task)
        elif task.match == "choice":
            logliks = choice_logliks(pipeline, task)
            picked = task.choices[int(np.argmax(logliks))]
            row = {"reply": picked, "right": picked == task.answers[0], "logliks": [round(x, 4) for x in logliks]}
        else:
            images = [read_image(task.image, pipeline.encoders)] if task.image else []
            reply = "".join(pipeline.session(max_tokens=MAX_ANSWER_TOKENS).ask(task.question, images=images))
            row = {"reply": reply.strip(), "right": is_right(task, reply)}
        scores.rows.append({"id": task.id, "match": task.match, **row})
        if on_task is not None:
            on_task()
    return scores


def _schema_reply(pipeline: Pipeline, task: Task) -> dict[str, Any]:
    jsonschema = require("jsonschema", "profile")
    grammar = pipeline.compile_schema(task.schema, f"{task.where}: schema") if task.constrained else None
    images = [read_image(task.image, pipeline.encoders)] if task.image else []
    session = pipeline.session(max_tokens=MAX_JSON_TOKENS, grammar=grammar)
    reply = "".join(session.ask(task.question, images=images))
    try:
        value = json.loads(reply)
    except json.JSONDecodeError:
        return {"reply": reply, "right": False}
    cls = jsonschema.Draft202012Validator
    validator = cls(task.schema, format_checker=cls.FORMAT_CHECKER)
    return {"reply": reply, "right": session.last_stats.finish_reason == "stop" and validator.is_valid(value)}


def choice_logliks(pipeline: Pipeline, task: Task) -> list[float]:
    """Each choice's log-likelihood after the chat prompt of the question: the sum over its tokens."""
    llm = pipeline.llm
    session = pipeline.session()
    prompt = session.prompt_tokens([*session.messages, {"role": "user", "content": task.question}])
    out = []
    for choice in task.choices:
        cont = llm.tokenize(choice, add_special=False, parse_special=False)
        logp = log_softmax(llm.score([*prompt, *cont], len(prompt) - 1)[:-1])
        out.append(float(logp[np.arange(len(cont)), cont].sum()))
    return out
