"""Sources: HF folder checks and a local GGUF dequantized into an HF folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vishwamai_edge.errors import SourceError
from vishwamai_edge.export.gguf import convert_hf_to_gguf
from vishwamai_edge.export.verify import TorchReference
from vishwamai_edge.sources import check_hf_dir, hf_dir_from_gguf


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
    assert hf_dir_from_gguf(gguf_path, tmp_path / "restored") == restored  # cached: not redone
