"""How a reply is judged against an answer: the text normalized, or its final number. Shared by `eval`'s
tasks on the device and GRPO's `answer` reward on the workstation, so training rewards what eval counts."""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalize(text: str) -> str:
    """Case-folded, spacing collapsed, punctuation and quotes stripped from the ends."""
    return re.sub(r"\s+", " ", text.casefold()).strip().strip(".,;:!?\"'`()[]{} ")


def is_number(text: str) -> bool:
    return NUMBER.fullmatch(text.strip()) is not None


def final_number(text: str) -> float | None:
    """The last number written in `text` (the answer after any working), None when there is none."""
    numbers = NUMBER.findall(text)
    return float(numbers[-1]) if numbers else None


def number_matches(reply: str, answer: str) -> bool:
    got = final_number(reply)
    return got is not None and got == float(answer)
