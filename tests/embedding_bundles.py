"""A bundle with the shipped all-MiniLM-L6-v2 beside a tiny LLM (F32, no quantization): what the embedding, index
and retrieval tests run on, built once per session."""

from __future__ import annotations

import pytest
import yaml
from rich.console import Console


@pytest.fixture(scope="session")
def embedding_bundle(tiny_model, tmp_path_factory):
    from vishwamai_edge.build import build
    from vishwamai_edge.recipe import load_recipe
    from vishwamai_edge.targets import get_target

    work = tmp_path_factory.mktemp("embedding-bundle")
    recipe = work / "tiny-docs.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny-docs", "source": {"kind": "hf", "path": str(tiny_model("llama"))},
        "export": {"gguf": {"outtype": "f32", "quants": [], "imatrix": False}},
        "embeddings": {"kind": "embedded"}}))
    return build(load_recipe(recipe), get_target("laptop-cpu"), work / "build", quant="f32",
                 console=Console(stderr=True, quiet=True))
