"""`eval --tasks`: the task lines checked one by one, the matching rules, and a multiple-choice set the test
draws itself (no published benchmark, nothing to have been trained on) through the shipped SmolLM2."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vishwamai_edge.errors import InputError
from vishwamai_edge.eval.tasks import Task, is_right, read_tasks

WORDS = ["apple", "river", "stone", "cloud", "garden", "window", "candle", "forest", "silver", "basket", "pencil",
         "mirror", "island", "ladder", "rocket", "violin", "tomato", "bridge", "planet", "castle"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", *args], capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("line, message", [
    ({"question": "Which?", "choices": ["a", "b"]}, "no answer"),
    ({"answer": "x"}, "no question"),
    ({"question": "Q", "answer": "x", "hint": "y"}, "unknown field 'hint'"),
    ({"question": "Q", "answer": "x", "match": "regex"}, "match is one of exact, contains"),
    ({"question": "Q", "answer": ""}, "answer is a non-empty string"),
    ({"question": "Q", "choices": ["a", "b"], "answer": "c"}, "'c' is not one of the choices"),
    ({"question": "Q", "choices": ["a", "b"], "answer": 2}, "no index of the 2 choices"),
    ({"question": "Q", "choices": ["a"], "answer": "a"}, "two or more"),
    ({"question": "Q", "choices": ["a", "b"], "answer": "a", "image": "x.png"}, "with an image is not supported"),
    ("[1, 2]", "each line must be a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_a_wrong_line_is_named(tmp_path, line, message):
    path = write_lines(tmp_path / "tasks.jsonl", [{"question": "Fine?", "answer": "yes"}, line])
    with pytest.raises(InputError, match=message) as err:
        read_tasks(path)
    assert f"{path}:2:" in str(err.value)


def test_lines_as_read(tmp_path):
    (tmp_path / "img").mkdir()
    path = write_lines(tmp_path / "tasks.jsonl", [
        {"question": "Q1", "answer": "Paris"},
        "",
        {"id": "colour-1", "question": "Q2", "answer": ["red", "crimson"], "match": "contains", "image": "img/a.png"},
        {"question": "Q3", "choices": ["x", "y", "z"], "answer": 1},
    ])
    one, two, three = read_tasks(path)
    assert (one.id, one.match, one.answers) == ("1", "exact", ("Paris",))
    assert (two.id, two.match, two.answers, two.image) == ("colour-1", "contains", ("red", "crimson"),
                                                          tmp_path / "img" / "a.png")
    assert (three.match, three.answers, three.choices) == ("choice", ("y",), ("x", "y", "z"))
    with pytest.raises(InputError, match="no task lines"):
        read_tasks(write_lines(tmp_path / "empty.jsonl", ["", "  "]))


def test_matching():
    exact = Task("f:1", "1", "Q", ("Paris",), "exact")
    assert is_right(exact, "  paris. ") and is_right(exact, '"PARIS"') and not is_right(exact, "Paris, France")
    contains = Task("f:1", "1", "Q", ("red", "dark blue"), "contains")
    assert is_right(contains, "It is RED.") and is_right(contains, "a Dark  Blue square")
    assert not is_right(contains, "It is reddish") and not is_right(contains, "blue")


def repeat_word_tasks(rng: random.Random, wrong: bool) -> list[dict]:
    """'Repeat this word' with the word and two others as choices; `wrong`: a distractor marked right."""
    lines = []
    for word in WORDS:
        others = rng.sample([w for w in WORDS if w != word], 2)
        choices = [word, *others]
        rng.shuffle(choices)
        lines.append({"id": word, "question": f"Repeat this word exactly: {word}", "choices": choices,
                      "answer": others[0] if wrong else word})
    return lines


def test_a_drawn_multiple_choice_set(embedded_build, tmp_path):
    """Right answers are picked (nearly always); the same set with a wrong choice marked right scores near
    zero, so the picks follow the likelihood; each choice's log-likelihood is the sum over its tokens that
    llama.cpp's own Python API gives."""
    f16 = tmp_path / "model-f16.gguf"
    shutil.copy(embedded_build.bundle.parent / "export" / "model-f16.gguf", f16)
    bundle = tmp_path / "q4"
    shutil.copytree(embedded_build.bundle, bundle)
    rng = random.Random(7)
    right = write_lines(tmp_path / "right.jsonl", repeat_word_tasks(rng, wrong=False))
    wrong = write_lines(tmp_path / "wrong.jsonl", repeat_word_tasks(random.Random(7), wrong=True))
    for name, tasks, rows in (("right", right, (f16, bundle)), ("wrong", wrong, (f16,))):
        proc = cli("eval", *map(str, rows), "--tasks", str(tasks), "--n-ctx", "256", "--threads", "2",
                   "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "right" / "report.json").read_text())
    f16_row, q4_row = report["bundles"]
    assert f16_row["tasks"]["tasks"] == len(WORDS) and f16_row["tasks"]["accuracy"] >= 0.9
    assert q4_row["tasks"]["accuracy"] >= 0.8 and q4_row["tasks"]["by_match"]["choice"]["tasks"] == len(WORDS)
    flipped = json.loads((tmp_path / "wrong" / "report.json").read_text())["bundles"][0]["tasks"]
    assert flipped["accuracy"] <= 0.1
    for name in ("report.md", "report.html", "plots/accuracy.png", "answers.jsonl"):
        assert (tmp_path / "right" / name).stat().st_size > 100
    assert "## Tasks" in (tmp_path / "right" / "report.md").read_text()

    answers = [json.loads(x) for x in (tmp_path / "right" / "answers.jsonl").read_text().splitlines()]
    first = next(a for a in answers if a["row"] == 0)
    task = read_tasks(right)[0]
    assert first["id"] == task.id and first["reply"] == task.choices[int(np.argmax(first["logliks"]))]
    assert first["logliks"] == pytest.approx(by_llama_cpp(f16, task), abs=0.02)


def by_llama_cpp(gguf: Path, task: Task) -> list[float]:
    """The choices' log-likelihoods through llama-cpp-python's high-level API (logits of every position)."""
    from llama_cpp import Llama

    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(gguf, RuntimeOptions(n_ctx=256, n_threads=2))
    try:
        session = pipeline.session()
        prompt = session.prompt_tokens([*session.messages, {"role": "user", "content": task.question}])
        conts = [pipeline.llm.tokenize(c, add_special=False, parse_special=False) for c in task.choices]
    finally:
        pipeline.close()
    llm = Llama(str(gguf), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    out = []
    for cont in conts:
        llm.reset()
        llm.eval([*prompt, *cont])
        logits = np.asarray(llm.scores[len(prompt) - 1:len(prompt) - 1 + len(cont)], dtype=np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        out.append(float(logp[np.arange(len(cont)), cont].sum()))
    llm.close()
    return out


def test_a_line_without_an_answer_is_one_line(embedded_bundle, tmp_path):
    tasks = write_lines(tmp_path / "tasks.jsonl", [{"question": "What is 2 + 2?"}])
    proc = cli("eval", str(embedded_bundle), "--tasks", str(tasks))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tasks}:1: no answer; every task line names its answer (or a schema)"]


def test_schema_tasks(embedded_build, tmp_path):
    """A schema task is right when the reply ends, parses and validates: always under the grammar; the free
    reply of the same question is judged by the same rule (SmolLM2 wraps its JSON in a code fence)."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "country": {"enum": ["France", "Spain", "Italy"]}},
              "required": ["city", "country"], "additionalProperties": False}
    question = "Which city is the capital of France? Answer as JSON with city and country."
    tasks = write_lines(tmp_path / "tasks.jsonl", [{"id": "held", "question": question, "schema": schema},
                                                   {"id": "free", "question": question, "schema": schema,
                                                    "constrained": False}])
    proc = cli("eval", str(embedded_build.bundle), "--tasks", str(tasks), "--n-ctx", "256", "--threads", "2",
               "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = {a["id"]: a for a in map(json.loads, (tmp_path / "report" / "answers.jsonl").read_text().splitlines())}
    assert answers["held"]["right"] and json.loads(answers["held"]["reply"])["country"] == "France"
    assert answers["free"]["right"] == _valid(answers["free"]["reply"], schema)
    with pytest.raises(InputError, match="keyword 'uniqueItems'"):
        read_tasks(write_lines(tmp_path / "bad.jsonl", [{"question": "Q", "schema": {"uniqueItems": True}}]))
    with pytest.raises(InputError, match="judged by its schema; leave out 'answer'"):
        read_tasks(write_lines(tmp_path / "bad.jsonl", [{"question": "Q", "schema": {}, "answer": "x"}]))


def _valid(reply: str, schema: dict) -> bool:
    import jsonschema

    try:
        return jsonschema.Draft202012Validator(schema).is_valid(json.loads(reply))
    except json.JSONDecodeError:
        return False
