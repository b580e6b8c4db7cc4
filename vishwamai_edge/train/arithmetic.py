"""The GRPO demo task (`dataset.arithmetic`): arithmetic questions with exact answers, drawn from a seed.

Two-digit sums and differences and one-digit products, asked as "What is 47 + 38? Reply with the number
only." SmolLM2-135M-Instruct answers about one in five greedily at the start: right often enough for a
group of samples to hold both right and wrong answers, which is what GRPO learns from. The held-out
questions never occur in training. Besides the train and eval JSONL (`prompt`, `answer`), the held-out set
is written as `eval --tasks` lines (match number), so a bundle is scored exactly as training scored it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..fsutil import atomic_file

TEMPLATE = "What is {}? Reply with the number only."


@dataclass(frozen=True)
class ArithmeticFiles:
    train: Path
    eval: Path
    tasks: Path  # the held-out set as `vishwamai-edge eval --tasks` lines


def question(rng: random.Random) -> tuple[str, int]:
    kind = rng.choice(("+", "-", "*"))
    if kind == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"{a} * {b}", a * b
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return (f"{a} + {b}", a + b) if kind == "+" else (f"{max(a, b)} - {min(a, b)}", abs(a - b))


def draw(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """`n_train` and `n_eval` distinct questions; none of the held-out ones is among the training ones."""
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    while len(seen) < n_train + n_eval:
        text, answer = question(rng)
        seen.setdefault(text, answer)
    rows = [{"prompt": TEMPLATE.format(text), "answer": str(answer)} for text, answer in seen.items()]
    return rows[:n_train], rows[n_train:]


def write_arithmetic(folder: Path, n_train: int, n_eval: int, seed: int) -> ArithmeticFiles:
    train, held_out = draw(n_train, n_eval, seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = ArithmeticFiles(folder / "train.jsonl", folder / "eval.jsonl", folder / "eval-tasks.jsonl")
    tasks = [{"question": r["prompt"], "answer": r["answer"], "match": "number"} for r in held_out]
    for path, rows in ((files.train, train), (files.eval, held_out), (files.tasks, tasks)):
        with atomic_file(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return files
