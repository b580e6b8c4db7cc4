"""Sources: HF folder checks and a local GGUF dequantized into an HF folder (cached by its sha256)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tiny_models
import transformers
from rich.console import Console
from safetensors.numpy import load_file

from vishwamai_edge.errors import SourceError
from vishwamai_edge.export.gguf import base, convert_hf_to_gguf
from vishwamai_edge.export.verify import TorchReference
from vishwamai_edge.recipe import Recipe, SourceSpec
from vishwamai_edge.sources import gguf as sources
from vishwamai_edge.sources.folders import check_hf_dir
from vishwamai_edge.sources.gguf import hf_dir_from_gguf
from vishwamai_edge.stages.context import BuildContext
from vishwamai_edge.stages.source import stage_source
from vishwamai_edge.stages.stamps import folder_fingerprint
from vishwamai_edge.targets import get_target


def test_hf_dir_checks(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        check_hf_dir(tmp_path / "missing")
    with pytest.raises(SourceError, match="no config.json"):
        check_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SourceError, match="no weights"):
        check_hf_dir(tmp_path)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_gguf_source_round_trip(tiny_model, tmp_path, family):
    """HF -> our F32 GGUF -> transformers' dequantization -> HF folder: same model, same logits.

    (Not the Llama 3 fixture: transformers' GGUF loader does not read llama3 rope scaling back.)
    """
    hf_dir = tiny_model(family)
    gguf_path = convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf", "f32").path
    restored = hf_dir_from_gguf(gguf_path, tmp_path / "restored")
    assert (restored / ".complete").is_file()
    assert json.loads((restored / "config.json").read_text())["num_hidden_layers"] == 2
    a, b = TorchReference(hf_dir), TorchReference(restored)
    prompt = "The capital of France is"
    assert a.token_ids(prompt) == b.token_ids(prompt)
    # the folder stores fp16 weights: differences are fp16 rounding only
    assert np.abs(a.last_logits(prompt) - b.last_logits(prompt)).max() < 2e-2


def file_stats(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_gguf_source_cached(tiny_model, tmp_path, monkeypatch):
    """A second call with the same GGUF neither reloads nor re-hashes it, and leaves the folder's files."""
    gguf_path = convert_hf_to_gguf(tiny_model("qwen2"), tmp_path / "m.gguf", "f32").path
    restored = hf_dir_from_gguf(gguf_path, tmp_path / "restored")
    before = file_stats(restored)

    def redone(*args, **kwargs):
        raise AssertionError("the cached source was redone")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", redone)
    monkeypatch.setattr(sources, "sha256_file", redone)
    sources._DIGESTS.clear()  # only the folder's record may spare the hashing
    assert hf_dir_from_gguf(gguf_path, tmp_path / "restored") == restored
    assert file_stats(restored) == before


def gguf_source_ctx(root, gguf_path) -> BuildContext:
    recipe = Recipe(name="from-gguf", source=SourceSpec(kind="gguf", path=gguf_path))
    return BuildContext(recipe, get_target("laptop-cpu"), root, Console(quiet=True))


def embeddings(hf_dir) -> np.ndarray:
    return load_file(str(hf_dir / "model.safetensors"))["model.embed_tokens.weight"].astype(np.float32)


def test_changed_gguf_source_is_rebuilt(tokenizer_dirs, tmp_path):
    """Another GGUF of the same size at the same path: the source folder (and its fingerprint) follow it."""
    models = {
        seed: tiny_models.build_tiny_model(
            tmp_path / f"hf{seed}", "qwen2", tokenizer_dirs["qwen2"], seed=seed, tie_word_embeddings=True
        )
        for seed in (0, 1)
    }
    ggufs = {s: convert_hf_to_gguf(d, tmp_path / f"m{s}.gguf", "f32").path for s, d in models.items()}
    assert ggufs[0].stat().st_size == ggufs[1].stat().st_size
    path = tmp_path / "recipe" / "model.gguf"
    path.parent.mkdir()
    ctx = gguf_source_ctx(tmp_path / "build", path)

    shutil.copyfile(ggufs[0], path)
    first = stage_source(ctx)
    fingerprint = folder_fingerprint(first)
    assert np.abs(embeddings(first) - embeddings(models[0])).max() < 1e-3

    shutil.copyfile(ggufs[1], path)
    second = stage_source(ctx)
    assert second == first  # same folder, remade
    assert np.abs(embeddings(second) - embeddings(models[1])).max() < 1e-3
    assert folder_fingerprint(second) != fingerprint  # so later stages' stamps no longer match
    assert json.loads((second / "source.json").read_text())["sha256"] == sources.sha256_file(ggufs[1])


def test_gguf_missing_weight_refused(tiny_model, tmp_path, monkeypatch):
    """transformers fills a weight the GGUF lacks with random values; the source refuses such a file.

    (Qwen2 here has tied embeddings: its absent output matrix is not reported.)
    """
    plan = base.ModelConverter.plan

    def without_one_matrix(self, qtype):
        return [p for p in plan(self, qtype) if p.name != "blk.1.ffn_down.weight"]

    monkeypatch.setattr(base.ModelConverter, "plan", without_one_matrix)
    gguf_path = convert_hf_to_gguf(tiny_model("qwen2"), tmp_path / "m.gguf", "f32").path
    missing = r"lacks weights the model needs: model\.layers\.1\.mlp\.down_proj\.weight$"
    with pytest.raises(SourceError, match=missing):
        hf_dir_from_gguf(gguf_path, tmp_path / "restored")
    assert not (tmp_path / "restored").exists()


@pytest.mark.parametrize("tied", [True, False])
def test_only_a_tied_output_may_be_absent(tied, tmp_path):
    """lm_head.weight may be absent only where tying fills it from the input embeddings."""
    config = tiny_models.tiny_config("qwen2", 32, tie_word_embeddings=tied)
    model = transformers.AutoModelForCausalLM.from_config(config)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if tied:
        sources._load_all_weights(model, state, set(), tmp_path / "m.gguf")
    else:
        with pytest.raises(SourceError, match=r"needs: lm_head\.weight$"):
            sources._load_all_weights(model, state, set(), tmp_path / "m.gguf")
