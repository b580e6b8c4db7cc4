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


# the published sizes (openbmb/MiniCPM-V-2 and MiniCPM-V-2_6 config.json)
PUBLISHED_2_0 = {"architectures": ["MiniCPMV"], "model_type": "minicpmv", "hidden_size": 2304,
                 "intermediate_size": 5760, "num_hidden_layers": 40, "num_attention_heads": 36,
                 "num_key_value_heads": 36, "vocab_size": 122753, "scale_emb": 12, "dim_model_base": 256,
                 "scale_depth": 1.4, "tie_word_embeddings": False, "query_num": 64, "drop_vision_last_layer": True,
                 "max_slice_nums": 9}
PUBLISHED_2_6 = {"architectures": ["MiniCPMV"], "model_type": "minicpmv", "version": 2.6, "hidden_size": 3584,
                 "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                 "num_key_value_heads": 4, "vocab_size": 151666, "tie_word_embeddings": False, "query_num": 64,
                 "slice_config": {"max_slice_nums": 9}, "vision_config": {"hidden_size": 1152,
                 "intermediate_size": 4304, "num_hidden_layers": 27, "patch_size": 14, "image_size": 980}}


@pytest.mark.parametrize("config, version", [(PUBLISHED_2_0, "2.0"), (PUBLISHED_2_6, "2.6")])
def test_memory_plan_for_orin_nano(config, version):
    from pathlib import Path

    from vishwamai_edge.export.minicpmv import MiniCPMVLayout, model_size
    from vishwamai_edge.memory_plan import plan_memory
    from vishwamai_edge.targets import get_target

    size = model_size(MiniCPMVLayout(Path("x"), config, version, ()), f"minicpm-v-{version}")
    assert size.image_tokens == 640  # (1 + 9 slices) x 64 queries
    if version == "2.0":
        # by hand: 26 so400m blocks 26 * (4 * 1152^2 + 2 * 1152 * 4304) + the 14 x 14 patch conv 3 * 196 * 1152,
        # resampler 1152 * 2304 + 5 * 2304^2 + 64 * 2304
        assert size.encoder_params == 396_523_008 + 29_343_744
    plan = plan_memory(size, get_target("orin-nano-8"), "q4_k_m", 4096)
    # 2.0: weights 1.87 + KV 1.51 + encoders 1.15 + runtime 0.50 = 5.03 of 6.50 GB: fits;
    # 2.6: 4.71 + 0.23 + 1.26 + 0.50 = 6.70 GB: does not (Qwen2-7B at Q4_K_M); the planner suggests what would
    assert plan.fits == (version == "2.0"), plan.line()
