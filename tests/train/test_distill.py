"""Distillation (train/distill.py through the SFT loop) on tiny random models: the three divergences, a pruned
student pulled towards its teacher (held-out perplexities of teacher, student before and after recorded), LoRA
or every weight, on-policy steps, exact resume, and a teacher of another vocabulary refused in one line."""

from __future__ import annotations

import json
import math

import pytest
import tiny_models
import torch
from rich.console import Console
from safetensors.torch import load_file

from vishwamai_edge.recipe import DistillSpec, PruneSpec
from vishwamai_edge.train import finetune as F
from vishwamai_edge.train.distill import divergence
from vishwamai_edge.train.lora import FinetuneError
from vishwamai_edge.train.prune import calibration_windows, prune_folder

QUIET = Console(stderr=True, quiet=True)


def test_the_divergences():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    forward = torch.nn.functional.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)  # KL(t || s)
    assert torch.allclose(divergence(s, t, DistillSpec(loss="forward_kl")), forward, atol=1e-6)
    reverse = torch.nn.functional.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(divergence(s, t, DistillSpec(loss="reverse_kl")), reverse, atol=1e-6)
    jsd = divergence(s, t, DistillSpec(loss="jsd", beta=0.5))
    assert torch.allclose(jsd, divergence(t, s, DistillSpec(loss="jsd", beta=0.5)), atol=1e-6)  # symmetric at 0.5
    assert (jsd >= 0).all() and (jsd <= math.log(2) + 1e-6).all()
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        assert divergence(s, s, DistillSpec(loss=loss)).abs().max() < 1e-6
    padded = torch.cat([t, torch.full((5, 3), -1e4)], -1)  # a teacher whose vocabulary rows are padded
    assert torch.allclose(divergence(s, padded, DistillSpec()), forward, atol=1e-6)


@pytest.fixture
def teacher_and_student(tmp_path, tokenizer_dirs):
    teacher = tiny_models.build_tiny_model(tmp_path / "teacher", "llama", tokenizer_dirs["llama3"],
                                           num_hidden_layers=4)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    cal = calibration_windows(tok(" ".join(tiny_models.CORPUS * 4))["input_ids"], 256, 64)
    prune_folder(teacher, tmp_path / "student", PruneSpec(layers=2), cal, "t", QUIET)
    return teacher, tmp_path / "student"


@pytest.fixture
def text(tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text/train.txt").write_text(" ".join(tiny_models.CORPUS * 6))
    (tmp_path / "text/eval.txt").write_text(" ".join(reversed(tiny_models.CORPUS * 2)))
    return tmp_path / "text"


def distill_recipe(make_recipe, student, text, distill=None, **kw):
    teacher = {"kind": "hf", "path": str(student.parent / "teacher")}
    spec = dict(method="distill", full=True, steps=6, batch_size=4, micro_batch_size=2, lr=3e-3, max_seq_len=32,
                save_every=2, distill={"teacher": teacher, **(distill or {})}, dataset={"train": str(text / "train.txt"),
                                                              "eval": str(text / "eval.txt")})
    return make_recipe(student, text / "train.txt", **{**spec, **kw})


def run(recipe, student, teacher, out, **kw):
    return F.finetune(recipe, student, out, F.run_fingerprint(recipe, "tiny", out), console=QUIET,
                      teacher_dir=teacher, **kw)


def test_a_pruned_student_learns_its_teachers_distributions(teacher_and_student, make_recipe, text, tmp_path):
    teacher, student = teacher_and_student
    result = run(distill_recipe(make_recipe, student, text), student, teacher, tmp_path / "d")
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    held = result.held_out
    # nearer the teacher on text it never trained on (random models: perplexity itself means little)
    assert held["after"]["divergence"] < 0.7 * held["student"]["divergence"]
    gap = held["student"]["ppl"] - held["teacher"]["ppl"]
    assert held["recovered"] == (pytest.approx((held["student"]["ppl"] - held["after"]["ppl"]) / gap, abs=1e-3)
                                 if gap > 0 else None)
    out = tmp_path / "d/model"
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    saved = json.loads((out / "training.json").read_text())
    assert saved["method"] == "distill" and saved["objective"]["loss"] == "forward_kl"
    assert saved["objective"]["teacher"] == str(teacher)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


@pytest.mark.parametrize("full", [True, False])
def test_an_interrupted_distillation_resumes_to_the_same_weights(teacher_and_student, make_recipe, text, tmp_path,
                                                                 full):
    """Half the steps on-policy (the student's own continuations, sampled in the step): resumed at step 2, the
    weights equal the uninterrupted run's, whole models and LoRA adapters alike."""
    teacher, student = teacher_and_student
    recipe = distill_recipe(make_recipe, student, text, full=full,
                            distill={"loss": "jsd", "on_policy": 0.5, "max_new_tokens": 8})
    whole = run(recipe, student, teacher, tmp_path / "whole")
    assert {h["on_policy"] for h in whole.history} == {True, False}

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(recipe, student, teacher, tmp_path / "cut", on_step=interrupt)
    resumed = run(recipe, student, teacher, tmp_path / "cut", resume=True)
    assert resumed.resumed_from == 2
    name = "model/model.safetensors" if full else "adapter/adapter_model.safetensors"
    a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "cut" / name)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert [h["loss"] for h in whole.history] == pytest.approx([h["loss"] for h in resumed.history], abs=1e-6)


def test_a_teacher_of_another_vocabulary_is_refused(teacher_and_student, tiny_model, make_recipe, text, tmp_path):
    _, student = teacher_and_student
    other = tiny_model("qwen2")
    with pytest.raises(FinetuneError, match=r"finetune.distill.teacher: .* has another vocabulary than the student "
                                            r"\([\d,]+ tokens against [\d,]+, [\d,]+ entries differ\)"):
        run(distill_recipe(make_recipe, student, text), student, other, tmp_path / "d")
    assert not (tmp_path / "d/model").exists()


def test_the_python_reference_text_is_split_by_whole_topics(tmp_path):
    from vishwamai_edge.train.python_docs import split_topics, write_python_docs

    train, held = split_topics(20_000, seed=0)
    assert 20_000 <= sum(map(len, held)) < 20_000 + max(map(len, held)) and not set(train) & set(held)
    assert sum(map(len, train)) > 300_000
    assert split_topics(20_000, seed=0) == (train, held) and split_topics(20_000, seed=1) != (train, held)
    files = write_python_docs(tmp_path, 20_000, 0)
    assert files.eval.read_text(encoding="utf-8").startswith(held[0])
