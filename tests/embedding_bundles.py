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


@pytest.fixture(scope="session")
def minilm_export(tmp_path_factory):
    """minilm_export(dtype) -> (folder, contract): the shipped all-MiniLM-L6-v2 exported once per dtype."""
    from vishwamai_edge.export.onnx.sentence_embeddings import export_sentence_embedder
    from vishwamai_edge.sources.embedded import embedded_sentence_embedder

    done: dict = {}

    def make(dtype: str):
        if dtype not in done:
            out = tmp_path_factory.mktemp(f"minilm-{dtype}") / "e"
            done[dtype] = out, export_sentence_embedder(embedded_sentence_embedder(), out, dtype, threads=2)
        return done[dtype]

    return make
