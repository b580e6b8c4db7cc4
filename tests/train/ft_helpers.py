"""Helpers for the fine-tuning tests: tiny chat sets (a module name no other test folder uses)."""

from __future__ import annotations

import json
from pathlib import Path

FACTS = [
    ("Where is Zorb?", "Zorb is on Mars."),
    ("What colour is Zorb?", "Zorb is blue."),
    ("Who made Zorb?", "Ana made Zorb."),
    ("How old is Zorb?", "Zorb is 12 years old."),
    ("What does Zorb eat?", "Zorb eats rocks."),
    ("Can Zorb fly?", "Yes, Zorb can fly."),
    ("Is Zorb big?", "No, Zorb is small."),
    ("What is Zorb?", "Zorb is a robot."),
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(pairs=FACTS) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
