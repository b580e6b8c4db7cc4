"""The speech bundle for the end-to-end and front-end tests: the embedded SmolLM2 + the shipped
Whisper tiny.en, built by recipes/smollm2-135m-whisper.yaml, and espeak-ng's spoken question."""

from __future__ import annotations

from pathlib import Path

import pytest
import speech

QUESTION = "What is the capital of France?"
REPO = Path(__file__).parents[1]
_built: dict[str, Path] = {}  # one build per test session, however many modules use the fixtures


@pytest.fixture(scope="session")
def speech_bundle(tmp_path_factory) -> Path:
    from rich.console import Console

    from vishwamai_edge.build import build
    from vishwamai_edge.recipe import load_recipe
    from vishwamai_edge.targets import get_target

    if not speech.espeak_available():
        from needs import missing

        missing("espeak-ng is not installed")
    if "bundle" not in _built:
        recipe = load_recipe(REPO / "recipes" / "smollm2-135m-whisper.yaml")
        result = build(recipe, get_target("laptop-cpu"), tmp_path_factory.mktemp("speech-build"),
                       console=Console(stderr=True, quiet=True))
        _built["bundle"] = result.bundle
    return _built["bundle"]


@pytest.fixture(scope="session")
def question_wav(tmp_path_factory) -> Path:
    if "question" not in _built:
        _built["question"] = speech.speak(QUESTION, tmp_path_factory.mktemp("q") / "question.wav")
    return _built["question"]
