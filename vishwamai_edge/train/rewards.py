"""Rewards for GRPO: each a function of (completion text, example) -> a number, named in the recipe.

Built-in:
- `answer`: 1 when the completion's final answer equals the example's `answer` (for a number, the last
  number in the completion; otherwise the normalized text), else 0. `format_bonus` is added when the
  completion is the answer alone, and only when it is right: a tiny model finds a format reward at once
  and would otherwise learn the format instead of the task.
- `json_schema`: 1 when the completion parses as JSON and validates against the recipe's schema (or the
  example's `schema` column), else 0.
- `regex`: 1 when the pattern is found in the completion, else 0.
- `length`: minus the characters past `target`, per `target` (0 up to it): long rambling costs.
- `python`: a function of the recipe's own, `def reward(completion: str, example: dict) -> float`, from the
  file the recipe names (relative to the recipe). The file is run as Python: name only your own files.

Each reward's value is multiplied by its `weight`; the total is their sum. Every part is logged apart.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RecipeError, UserError, require
from ..eval.answers import is_number, normalize, number_matches
from ..recipe import RewardSpec


class RewardError(UserError):
    """A reward could not be computed for an example: it raised, or returned something that is not a number."""


@dataclass(frozen=True)
class Reward:
    name: str  # as logged: the kind, or the python function's name
    weight: float
    fn: Callable[[str, dict[str, Any]], float]

    def __call__(self, completion: str, example: dict[str, Any], where: str) -> float:
        try:
            value = self.fn(completion, example)
        except Exception as exc:  # noqa: BLE001  the user's function: any error is theirs to see, in one line
            raise RewardError(f"reward {self.name!r} raised {type(exc).__name__} ({exc}) on {where}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RewardError(f"reward {self.name!r} returned {value!r} on {where}; a reward is a finite number")
        return float(value)


def is_right(completion: str, answer: Any) -> bool:
    """As `eval` judges it: a number answer by the completion's last number (match number), any other by the
    normalized text (match exact)."""
    answer = str(answer)
    return number_matches(completion, answer) if is_number(answer) else normalize(completion) == normalize(answer)


def build_rewards(specs: list[RewardSpec], recipe_dir: Path) -> list[Reward]:
    """The recipe's rewards, each checked now: a missing file or function fails before any model loads."""
    return [_build(spec, recipe_dir) for spec in specs]


def _build(spec: RewardSpec, recipe_dir: Path) -> Reward:
    if spec.kind == "answer":
        bonus = spec.format_bonus

        def answer(completion: str, example: dict[str, Any]) -> float:
            if "answer" not in example:
                raise KeyError("the example has no 'answer' column")
            if not is_right(completion, example["answer"]):
                return 0.0
            alone = normalize(completion) == normalize(str(example["answer"]))
            return 1.0 + (bonus if alone else 0.0)

        return Reward("answer", spec.weight, answer)
    if spec.kind == "json_schema":
        jsonschema = require("jsonschema", "profile")
        fixed = spec.schema_

        def valid_json(completion: str, example: dict[str, Any]) -> float:
            schema = fixed if fixed is not None else example.get("schema")
            if schema is None:
                raise KeyError("no schema: give the reward a schema or the example a 'schema' column")
            try:
                value = json.loads(completion)
            except json.JSONDecodeError:
                return 0.0
            return 1.0 if jsonschema.Draft202012Validator(schema).is_valid(value) else 0.0

        return Reward("json_schema", spec.weight, valid_json)
    if spec.kind == "regex":
        assert spec.pattern is not None
        pattern = re.compile(spec.pattern)
        return Reward("regex", spec.weight, lambda completion, example: 1.0 if pattern.search(completion) else 0.0)
    if spec.kind == "length":
        target = spec.target or 1
        return Reward("length", spec.weight, lambda completion, example: -max(0, len(completion) - target) / target)
    assert spec.file is not None and spec.function is not None
    return Reward(spec.function, spec.weight, load_function(recipe_dir / spec.file, spec.function))


def load_function(path: Path, name: str) -> Callable[[str, dict[str, Any]], float]:
    """`name` from the Python file at `path`, which the recipe names explicitly (it runs as the user's code)."""
    if not path.is_file():
        raise RecipeError(f"finetune.grpo.rewards: {path}: no such file")
    module_spec = importlib.util.spec_from_file_location(f"vishwamai_edge_reward_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise RecipeError(f"finetune.grpo.rewards: {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001  the user's file
        raise RecipeError(f"finetune.grpo.rewards: {path} failed to load: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RecipeError(f"finetune.grpo.rewards: {path} has no function {name!r}")
    return fn
