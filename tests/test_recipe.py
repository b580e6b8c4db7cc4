"""Recipe loading: every mistake is one line naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from vishwamai_edge.errors import RecipeError
from vishwamai_edge.recipe import load_recipe
from vishwamai_edge.targets import TARGETS, get_target

REPO = Path(__file__).parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_shipped_recipes_validate():
    for path in (REPO / "recipes").glob("*.yaml"):
        assert load_recipe(path).name == path.stem


def test_unknown_field_named(tmp_path):
    p = write(tmp_path, "name: x\nexport:\n  gguf:\n    quantz: [q4_k_m]\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(e.value) == f"{p}: export.gguf.quantz: unknown field"


def test_missing_field_named(tmp_path):
    p = write(tmp_path, "source:\n  kind: embedded\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: name: required field is missing"):
        load_recipe(p)


def test_wrong_value_named(tmp_path):
    p = write(tmp_path, "name: x\nexport:\n  gguf:\n    quants: [q3_xs]\n")
    with pytest.raises(RecipeError, match=r"export\.gguf\.quants\.0: "):
        load_recipe(p)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="line 2"):
        load_recipe(write(tmp_path, "name: x\n  bad: : indent\n"))
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides(tmp_path):
    p = write(tmp_path, "name: x\n")
    r = load_recipe(p, ["export.gguf.quants=[q8_0, q5_k_m]", "runtime.n_ctx=4096"])
    assert r.export.gguf.quants == ["q8_0", "q5_k_m"] and r.runtime.n_ctx == 4096
    with pytest.raises(RecipeError, match="runtime.bogus: unknown field"):
        load_recipe(p, ["runtime.bogus=1"])


def test_kv_type(tmp_path):
    p = write(tmp_path, "name: x\nruntime:\n  kv_type: q8_0\n")
    assert load_recipe(p).runtime.kv_type == "q8_0"
    assert load_recipe(write(tmp_path, "name: x\n")).runtime.kv_type == "f16"
    with pytest.raises(RecipeError, match=r"runtime\.kv_type: "):
        load_recipe(p, ["runtime.kv_type=q3_k"])


def test_relative_source_path(tmp_path):
    p = write(tmp_path, "name: x\nsource:\n  kind: hf\n  path: models/m\n")
    r = load_recipe(p)
    assert r.resolve(r.source.path) == (tmp_path / "models" / "m").resolve()


def test_targets():
    assert {"laptop-cpu", "x86-cuda", "orin-agx-64", "orin-agx-32", "orin-nx-16", "orin-nano-8"} <= set(TARGETS)
    assert get_target("orin").name == "orin-agx-64"
    assert all(t.cuda_arch == "87" for t in TARGETS.values() if t.jetson)
    with pytest.raises(Exception, match="unknown target"):
        get_target("raspberry")


def test_quantized_llm_must_be_what_the_bundle_ships(tmp_path):
    align = ("name: x\nfinetune:\n  method: align\n  dataset: {shapes: {train: 12, eval: 6}}\n"
             "  align: {quantized_llm: q4_k_m, stage2_steps: %d}\nexport:\n  gguf: {quants: [%s], imatrix: %s}\n")
    assert load_recipe(write(tmp_path, align % (0, "q4_k_m", "false"))).finetune.align.quantized_llm == "q4_k_m"
    with pytest.raises(RecipeError, match="is not one of export.gguf.quants"):
        load_recipe(write(tmp_path, align % (0, "q8_0", "false")))
    with pytest.raises(RecipeError, match="needs export.gguf.imatrix: false"):
        load_recipe(write(tmp_path, align % (0, "q4_k_m", "true")))
    with pytest.raises(RecipeError, match=r"finetune\.align: .*stage 2 changes the LLM"):
        load_recipe(write(tmp_path, align % (3, "q4_k_m", "false")))
