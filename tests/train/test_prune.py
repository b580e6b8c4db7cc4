"""Pruning (train/prune.py) on tiny random models: the block whose removal costs nothing is the one dropped,
channel and head cuts write a smaller folder that loads, equals the unpruned model with the same parts removed
and converts to a GGUF that llama.cpp runs like torch; targets the model cannot take fail in one line."""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from vishwamai_edge.export.gguf import convert_hf_to_gguf
from vishwamai_edge.export.verify import TorchReference, check_gguf
from vishwamai_edge.recipe import DEFAULT_VERIFY_PROMPTS, PruneSpec
from vishwamai_edge.train.prune import PRUNE_FILE, PruneError, calibration_windows, parse_params, prune_folder

QUIET = Console(stderr=True, quiet=True)


def calibration(hf_dir, n=256):
    tok = AutoTokenizer.from_pretrained(hf_dir)
    return calibration_windows(tok(" ".join(tiny_models.CORPUS * 4))["input_ids"], n, 64)


@pytest.fixture
def four_blocks(tmp_path, tokenizer_dirs):
    """A 4-block Llama whose block 2 adds nothing to the residual stream (o_proj and down_proj zero)."""
    out = tiny_models.build_tiny_model(tmp_path / "four", "llama", tokenizer_dirs["llama3"], num_hidden_layers=4)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    model.save_pretrained(out)
    return out


def test_depth_pruning_drops_the_block_whose_removal_costs_least(four_blocks, tmp_path):
    """Each block's score is the loss without it: the no-op block's is the full model's to the digit. On a random
    model another block's removal may even help; whichever scores lowest goes, and the folder written equals the
    model run without it."""
    cal = calibration(four_blocks)
    result = prune_folder(four_blocks, tmp_path / "p", PruneSpec(layers=3), cal, "t", QUIET)
    assert result.block_losses[2] == pytest.approx(result.loss[0], abs=1e-5)
    assert result.dropped == [min(range(4), key=lambda i: result.block_losses[i])] and result.layers == (4, 3)
    assert result.loss[1] == pytest.approx(min(result.block_losses), abs=1e-5)
    (drop,) = result.dropped
    ids = torch.tensor([cal[0]])
    a = AutoModelForCausalLM.from_pretrained(four_blocks).eval()
    a.model.layers = torch.nn.ModuleList([b for i, b in enumerate(a.model.layers) if i != drop])
    a.config.num_hidden_layers = 3
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    assert b.config.num_hidden_layers == 3 and len(b.model.layers) == 3
    with torch.no_grad():
        assert torch.allclose(a(ids, use_cache=False).logits, b(ids).logits, atol=1e-5)
    recorded = json.loads((tmp_path / "p" / PRUNE_FILE).read_text())
    assert recorded["params"][1] < recorded["params"][0] and recorded["check_max_abs_diff"] < 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_width_and_depth_cuts_write_a_folder_every_exporter_takes(tiny_model, tmp_path, family):
    """Qwen2 (q/k/v biases, tied embeddings) and Gemma (a head_dim of its own) as well as Llama: 2 of 4 query
    heads (one per key/value group), 64 of 128 MLP channels, 1 of 2 blocks; the folder's logits equal the
    unpruned model with those parts removed (checked inside), and the F16 GGUF's equal torch's."""
    hf = tiny_model(family)
    out = tmp_path / "p"
    heads = 4 if family == "qwen2" else 2  # llama.cpp's qwen2 keeps the query projection as wide as the model
    result = prune_folder(hf, out, PruneSpec(layers=1, mlp=64, heads=None if family == "qwen2" else 2),
                          calibration(hf), "t", QUIET)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["num_attention_heads"]) == (1, 64, heads)
    if heads == 2:
        assert cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == (32 if family == "gemma" else 16)
    if "layer_types" in cfg:
        assert len(cfg["layer_types"]) == 1
    assert result.params[1] < result.params[0] * 0.8
    gguf = convert_hf_to_gguf(out, tmp_path / "p.gguf", "f16")
    check = check_gguf(TorchReference(out), gguf.path, DEFAULT_VERIFY_PROMPTS, n_threads=2)
    assert check.max_abs_diff < 2e-2 and check.top1_agreement == 1.0, check


def test_heads_of_a_qwen2_model_stay(tiny_model, tmp_path):
    hf = tiny_model("qwen2")
    with pytest.raises(PruneError, match="prune.heads: not for a qwen2 model: llama.cpp's qwen2 architecture"):
        prune_folder(hf, tmp_path / "p", PruneSpec(heads=2), calibration(hf), "t", QUIET)


def test_a_parameter_budget_keeps_as_many_blocks_as_fit(four_blocks, tmp_path):
    cfg = json.loads((four_blocks / "config.json").read_text())
    from vishwamai_edge.memory_plan import model_size

    size = model_size(cfg)
    two = type(size)(**{**size.__dict__, "layers": 2}).params
    result = prune_folder(four_blocks, tmp_path / "p", PruneSpec(params=int(two) + 10), calibration(four_blocks),
                          "t", QUIET)
    assert result.layers == (4, 2)
    assert parse_params("90M") == 90_000_000 and parse_params("1.5B") == 1_500_000_000


@pytest.mark.parametrize("spec, message", [
    ({"layers": 9}, r"prune.layers: 9 is more than the model's 4 blocks"),
    ({"layers": 4}, r"the target is the model's own size"),
    ({"mlp": 999}, r"prune.mlp: 999 is more than the model's 128 MLP channels"),
    ({"heads": 3}, r"prune.heads: 3 is not a multiple of the model's 2 key/value heads"),
    ({"params": "1B"}, r"prune.params: 1,000,000,000 is not below the model's"),
    ({"params": 1000}, r"below even one block's model"),
    ({"params": "lots"}, r"'lots' is not a parameter count"),
])
def test_targets_the_model_cannot_take_fail_in_one_line(four_blocks, tmp_path, spec, message):
    with pytest.raises(PruneError, match=message):
        prune_folder(four_blocks, tmp_path / "p", PruneSpec(**spec), calibration(four_blocks), "t", QUIET)
    assert not (tmp_path / "p").exists()
