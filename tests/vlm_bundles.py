"""A vision-language bundle for the front-end tests (API, UI): recipes/llava-1.5-7b.yaml run on a tiny
random model in llava-hf/llava-1.5-7b-hf's exact layout, built to an F32 GGUF and an fp32 ONNX vision
tower, and the in-process answers the front ends must equal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from vision_models import build_tiny_llava15_hf

_built: dict[str, Path] = {}  # one build per test session, however many conftests use the fixture


RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "llava-1.5-7b.yaml"


def build_vlm_bundle(root: Path) -> Path:
    from rich.console import Console

    from vishwamai_edge.build import build
    from vishwamai_edge.recipe import load_recipe
    from vishwamai_edge.targets import get_target

    src = build_tiny_llava15_hf(root / "llava-1.5-7b-hf", root / "work")
    recipe = load_recipe(RECIPE, [f"source.path={src}", "export.gguf.outtype=f32", "export.gguf.quants=[]",
                                  "export.gguf.imatrix=false", "export.vision.dtype=fp32"])
    result = build(recipe, get_target("laptop-cpu"), root / "build", quant="f32",
                   console=Console(stderr=True, quiet=True))
    return result.bundle


@pytest.fixture(scope="session")
def vlm_bundle(tmp_path_factory) -> Path:
    if "clip" not in _built:
        _built["clip"] = build_vlm_bundle(tmp_path_factory.mktemp("vlm-bundle"))
    return _built["clip"]


def photo(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def in_process_answers(bundle: Path, turns: list[tuple[str, list[np.ndarray]]], max_tokens: int) -> list[str]:
    """The greedy answers of one session to `turns` (text, images) in order: what a front end must show."""
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(bundle, RuntimeOptions(n_threads=1))
    try:
        session = pipeline.session(max_tokens=max_tokens)
        return ["".join(session.ask(text, images=images)) for text, images in turns]
    finally:
        pipeline.close()
