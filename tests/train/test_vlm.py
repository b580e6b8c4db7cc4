"""Vision-language fine-tuning on a tiny random LLaVA: LoRA on the language model only,
vision tower frozen (and bit-identical after training), projector trained only when asked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from ft_helpers import write_jsonl
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file
from tiny_vlm import build_tiny_llava

from vishwamai_edge.train import data as D
from vishwamai_edge.train.finetune import finetune, run_fingerprint
from vishwamai_edge.train.lora import load_for_training
from vishwamai_edge.train.merge import merge_adapter

QUIET = Console(stderr=True, quiet=True)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tokenizer_dirs):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), tokenizer_dirs["llama3"])


@pytest.fixture
def vlm_jsonl(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i, colour in enumerate(["red", "green", "blue", "black"]):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(tmp_path / f"{i}.png")
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"{i}.png"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": f"It is {colour}."},
        ]})
    rows.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
    return write_jsonl(tmp_path / "vlm.jsonl", rows)


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_image_tokens_expanded_and_never_trained(llava_dir, vlm_jsonl):
    processor = transformers.AutoProcessor.from_pretrained(llava_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llava_dir)
    examples, _ = D.encode_chats(D.read_dataset(vlm_jsonl), tokenizer, 256, processor)
    ex = examples[0]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert ex.input_ids.count(image_id) == 16  # (32 / 8)^2 patches, CLS dropped
    assert ex.extra["pixel_values"].shape == (1, 3, 32, 32)
    assert all(lab == D.IGNORE for t, lab in zip(ex.input_ids, ex.labels) if t == image_id)
    assert tokenizer.decode([t for t in ex.labels if t != D.IGNORE]) == "It is red.<|im_end|>\n"
    assert "pixel_values" not in examples[-1].extra  # a text-only turn in the same set


def test_lora_on_language_model_only_with_frozen_vision_tower(llava_dir, vlm_jsonl, make_recipe):
    recipe = make_recipe(llava_dir, vlm_jsonl, lora={"train_projector": True})
    loaded = load_for_training(llava_dir, recipe.finetune, torch.device("cpu"), "r.yaml")
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert all("language_model" in n for n in trainable if "lora_" in n)
    assert any("multi_modal_projector" in n for n in trainable)
    vision = [p for n, p in loaded.model.named_parameters() if "vision_tower" in n]
    assert vision and not any(p.requires_grad for p in vision)


@pytest.mark.parametrize("train_projector", [True, False])
def test_training_leaves_the_vision_tower_unchanged(llava_dir, vlm_jsonl, make_recipe, tmp_path, train_projector):
    recipe = make_recipe(llava_dir, vlm_jsonl, steps=3, batch_size=5, micro_batch_size=5,
                         lora={"train_projector": train_projector}, max_seq_len=256)
    result = finetune(recipe, llava_dir, tmp_path / "ft", run_fingerprint(recipe, "t"), console=QUIET)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    adapter_keys = load_file(f"{result.adapter}/adapter_model.safetensors").keys()
    assert not any("vision_tower" in k for k in adapter_keys)
    assert any("multi_modal_projector" in k for k in adapter_keys) == train_projector

    check = merge_adapter(tmp_path / "ft/adapter", tmp_path / "merged", llava_dir, ["Colour?", "Hi"], 1e-4, QUIET)
    assert check.max_abs_diff < 1e-4 and check.top1_agreement == 1.0
    base, merged = weights(llava_dir), weights(tmp_path / "merged")
    assert base.keys() == merged.keys()
    for name in base:
        same = torch.equal(base[name], merged[name])
        if "vision_tower" in name:
            assert same, name  # frozen: bit-identical
        elif "multi_modal_projector" in name:
            assert same != train_projector, name
    assert any(not torch.equal(base[n], merged[n]) for n in base if "language_model" in n and "proj" in n)
    assert (tmp_path / "merged/processor_config.json").is_file()
    assert json.loads((tmp_path / "merged/config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
