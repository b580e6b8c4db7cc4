"""MiniCPM-V folders: version and parts read from config + tensors, the LLM split out and through GGUF, errors.

GGUF parity of the split LLM uses the exporter's tolerances (tests/export/test_gguf.py): f16 2e-2 max abs
on the last-token logits, top-1 agreement on every prompt.
"""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from vishwamai_edge.errors import SourceError
from vishwamai_edge.export.gguf import convert_hf_to_gguf
from vishwamai_edge.export.minicpmv import read_minicpmv, write_llm_folder
from vishwamai_edge.export.verify import TorchReference, check_gguf
from vishwamai_edge.recipe import DEFAULT_VERIFY_PROMPTS


@pytest.mark.parametrize("variant, arch", [("2.0", "minicpm"), ("2.6", "qwen2")])
def test_llm_split_and_gguf_parity(tiny_minicpmv, tmp_path, variant, arch):
    layout = read_minicpmv(tiny_minicpmv(variant))
    assert layout.version == variant
    assert layout.slices.query_num == 8 and layout.slices.max_slice_nums == 9
    llm = tmp_path / "llm"
    llm.mkdir()
    write_llm_folder(layout, llm)
    config = json.loads((llm / "config.json").read_text())
    assert "vision_config" not in config and "query_num" not in config
    out = convert_hf_to_gguf(llm, tmp_path / "llm.gguf", "f16")
    assert out.arch == arch
    check = check_gguf(TorchReference(llm), out.path, DEFAULT_VERIFY_PROMPTS, n_threads=2)
    assert check.max_abs_diff < 2e-2 and check.top1_agreement == 1.0 and check.tokenizer_agreement == 1.0, check


def _edited(src, tmp_path, config_edit=None, drop=()):
    out = tmp_path / "edited"
    shutil.copytree(src, out)
    if config_edit:
        config = json.loads((out / "config.json").read_text())
        config_edit(config)
        (out / "config.json").write_text(json.dumps(config))
    if drop:
        state = load_file(str(out / "model.safetensors"))
        save_file({k: v for k, v in state.items() if not k.startswith(drop)}, str(out / "model.safetensors"))
    return out


def test_unknown_version(tiny_minicpmv, tmp_path):
    folder = _edited(tiny_minicpmv("2.6"), tmp_path, lambda c: c.update(version=2.5))
    with pytest.raises(SourceError, match=r"config.json: MiniCPM-V version 2.5 is not supported; known: 2.0, 2.6"):
        read_minicpmv(folder)


def test_missing_resampler(tiny_minicpmv, tmp_path):
    folder = _edited(tiny_minicpmv("2.0"), tmp_path, drop=("resampler.",))
    with pytest.raises(SourceError, match=r"no resampler tensors resampler\.query, resampler\.attn\.in_proj_weight"):
        read_minicpmv(folder)


def test_version_must_match_the_tower(tiny_minicpmv, tmp_path):
    folder = _edited(tiny_minicpmv("2.6"), tmp_path, lambda c: c.update(version="2.0"))
    with pytest.raises(SourceError, match="config says MiniCPM-V 2.0 but the vision tower's tensors are 2.6's"):
        read_minicpmv(folder)


def test_no_version_and_no_minicpm_keys(tiny_minicpmv, tmp_path):
    folder = _edited(tiny_minicpmv("2.6"), tmp_path, lambda c: c.pop("version"))
    with pytest.raises(SourceError, match="no MiniCPM-V version"):
        read_minicpmv(folder)
