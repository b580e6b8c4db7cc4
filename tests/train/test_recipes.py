"""The finetune section of recipes: defaults, validation errors naming the field, the shipped recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from vishwamai_edge.demo import BUILTIN_FINETUNE, FINETUNE_RECIPE
from vishwamai_edge.errors import RecipeError
from vishwamai_edge.recipe import FinetuneSpec, load_recipe

ROOT = Path(__file__).parents[2]


def test_shipped_finetune_recipe_loads_with_its_data():
    recipe = load_recipe(ROOT / FINETUNE_RECIPE)
    spec = recipe.finetune
    assert spec.method == "lora" and spec.steps == 40 and spec.batch_size == 8 and spec.lr == 5e-4
    assert recipe.resolve(spec.dataset.train).is_file() and recipe.resolve(spec.dataset.eval).is_file()


def test_builtin_demo_recipe_matches_the_shipped_one():
    """Outside a checkout the demo uses a copy of the recipe's settings: keep them equal."""
    shipped = load_recipe(ROOT / FINETUNE_RECIPE).finetune.model_dump(exclude={"dataset"})
    builtin = FinetuneSpec.model_validate({**BUILTIN_FINETUNE, "dataset": {"train": "x"}})
    assert builtin.model_dump(exclude={"dataset"}) == shipped


@pytest.mark.parametrize(
    "section, message",
    [
        ("finetune: {dataset: {train: a.jsonl}, lora: {rank: 8}}", "finetune.lora.rank: unknown field"),
        ("finetune: {lora: {r: 8}}", "finetune.dataset: required field is missing"),
        ("finetune: {method: dora, dataset: {train: a.jsonl}}", "finetune.method: Input should be 'lora', 'qlora', 'cpt', 'align', 'grpo' or 'distill'"),
        ("finetune: {dataset: {train: a.jsonl}, lr: 0}", "finetune.lr: Input should be greater than 0"),
        ("finetune: {method: align, dataset: {shapes: {}}, align: {projector: {tokens: 10}}}",
         "finetune.align.projector.tokens: must be a square number"),
        ("finetune: {method: align, dataset: {shapes: {}}, align: {encoder: {kind: hf}}}",
         "finetune.align.encoder: path: required for encoder kind 'hf'"),
        ("finetune: {method: align, dataset: {shapes: {}}, align: {encoder: {kind: resnet}}}",
         "finetune.align.encoder.kind: Input should be 'efficientnet-lite0', 'hf' or 'whisper'"),
        ("finetune: {method: align, dataset: {train: a.jsonl}, align: {encoder: {kind: whisper}}}",
         "finetune.align.encoder: path: required for encoder kind 'whisper'"),
        ("finetune: {method: align, dataset: {train: a.jsonl}, align: {encoder: {kind: whisper, path: w},"
         " projector: {tokens: 16}}}", "finetune.align: projector.tokens: an audio projector"),
        ("finetune: {method: lora, dataset: {train: a.jsonl}, align: {}}", "align: only for method 'align'"),
        ("finetune: {method: align, dataset: {train: a.jsonl, shapes: {}}}", "give one of a train file, shapes"),
        ("finetune: {method: lora, dataset: {train: a.jsonl}, grpo: {}}", "grpo: only for method 'grpo'"),
        ("finetune: {method: lora, dataset: {arithmetic: {}}}", "dataset.arithmetic: a generated task is for method"),
        ("finetune: {method: grpo, dataset: {arithmetic: {}}, batch_size: 3, micro_batch_size: 5}",
         "batch_size x grpo.num_generations (24 completions) must be a multiple of micro_batch_size (5)"),
        ("finetune: {method: grpo, dataset: {arithmetic: {}}, grpo: {rewards: []}}",
         "finetune.grpo.rewards: List should have at least 1 item"),
        ("finetune: {method: grpo, dataset: {arithmetic: {}}, grpo: {rewards: [{kind: length}]}}",
         "finetune.grpo.rewards.0: target: required for a reward of kind 'length'"),
        ("finetune: {method: grpo, dataset: {arithmetic: {}, eval: e.jsonl}}", "eval: the arithmetic set brings"),
        ("finetune: {method: distill, dataset: {python_docs: {}}}",
         ": finetune.distill.teacher: required when no prune section makes the student smaller"),
        ("finetune: {method: distill, dataset: {python_docs: {}}, distill: {teacher: {kind: gguf, path: t.gguf, "
         "use_as_is: true}}}", "finetune.distill.teacher: use_as_is: a teacher is run in torch"),
        ("finetune: {method: distill, dataset: {python_docs: {}}, distill: {loss: kl}}",
         "finetune.distill.loss: Input should be 'forward_kl', 'reverse_kl' or 'jsd'"),
        ("finetune: {method: lora, dataset: {train: a.jsonl}, distill: {}}", "distill: only for method 'distill'"),
        ("finetune: {method: lora, dataset: {python_docs: {}}}", "dataset.python_docs: raw text is for method"),
        ("finetune: {method: grpo, full: true, dataset: {arithmetic: {}}}",
         "full: method 'grpo' trains adapters only (its KL reference is the model with them switched off)"),
        ("prune: {}\nfinetune: {method: distill, dataset: {python_docs: {}}}",
         "prune: give a target: layers, mlp, heads or params"),
        ("prune: {layers: 0}", "prune.layers: Input should be greater than or equal to 1"),
        ("embeddings: {kind: hub}", "embeddings: repo: required for embeddings kind 'hub', and only for it"),
        ("embeddings: {kind: hf}", "embeddings: path: required for embeddings kind 'hf'"),
        ("embeddings: {kind: embedded, path: x}", "embeddings: path: only for embeddings kind 'hf'"),
        ("prune: {layers: 20}\nfinetune: {method: grpo, dataset: {arithmetic: {}}}",
         ": prune: a pruned student is recovered by method distill (or lora, cpt), not grpo"),
    ],
)
def test_bad_finetune_fields_name_the_field(tmp_path, section, message):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\n{section}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_override_from_the_command_line(tmp_path):
    recipe = load_recipe(ROOT / FINETUNE_RECIPE, ["finetune.method=qlora", "finetune.lora.r=8"])
    assert recipe.finetune.method == "qlora" and recipe.finetune.lora.r == 8
