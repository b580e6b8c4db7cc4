"""Fixtures for the fine-tuning tests: tiny chat sets and recipes around the tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ft_helpers import chat_rows, write_jsonl

from vishwamai_edge.recipe import load_recipe


@pytest.fixture
def chat_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", chat_rows())


@pytest.fixture
def make_recipe(tmp_path):
    """make_recipe(hf_dir, train, **finetune overrides) -> Recipe with a finetune section, from a YAML file."""

    def make(hf_dir: Path, train: Path, name: str = "tiny-ft", **finetune):
        spec = {
            "method": "lora", "dataset": {"train": str(train)}, "lora": {"r": 4, "alpha": 8},
            "max_seq_len": 64, "steps": 6, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-2,
            "lr_schedule": "constant", "save_every": 2, "seed": 0,
        }
        for key, value in finetune.items():
            if isinstance(value, dict) and isinstance(spec.get(key), dict):
                spec[key] = {**spec[key], **value}
            else:
                spec[key] = value
        data = {"name": name, "source": {"kind": "hf", "path": str(hf_dir)}, "finetune": spec}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_recipe(path)

    return make
