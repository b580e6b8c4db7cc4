"""The training loop on a tiny random Llama: learning, accumulation, resume, methods, errors."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from vishwamai_edge.errors import RecipeError
from vishwamai_edge.train import finetune as F
from vishwamai_edge.train.lora import FinetuneError, training_dtype

QUIET = Console(stderr=True, quiet=True)


def train(recipe, hf_dir, out, **kw):
    return F.finetune(recipe, hf_dir, out, F.run_fingerprint(recipe, "tiny"), console=QUIET, **kw)


def adapter_weights(result) -> dict[str, torch.Tensor]:
    return load_file(f"{result.adapter}/adapter_model.safetensors")


@pytest.mark.filterwarnings("error::FutureWarning")  # no library warnings reach the user (peft's alias read)
def test_lora_learns_and_writes_an_adapter(tiny_model, chat_jsonl, make_recipe, tmp_path):
    hf = tiny_model("llama")
    recipe = make_recipe(hf, chat_jsonl, steps=12, dataset={"eval_fraction": 0.25}, eval_every=6)
    result = train(recipe, hf, tmp_path / "ft")
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0]
    assert result.eval_loss is not None and "eval_loss" in result.history[5]
    assert result.tokens_per_s > 0 and result.train_tokens > 0 and result.peak_memory_mb > 0
    assert result.target_modules == 14  # 2 layers x (q, k, v, o, gate, up, down)
    cfg = json.loads((tmp_path / "ft/adapter/adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(hf.resolve())
    assert json.loads((tmp_path / "ft/adapter/training.json").read_text())["final_loss"] == result.final_loss
    assert not (tmp_path / "ft/checkpoints").exists()  # superseded by the adapter


def assert_same_training(a, b, tol: float) -> None:
    """Two runs took the same steps: losses step by step and final adapter weights within `tol`."""
    for x, y in zip(a.history, b.history):
        assert x["loss"] == pytest.approx(y["loss"], abs=tol)
    wa, wb = adapter_weights(a), adapter_weights(b)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < tol


def test_gradient_accumulation_matches_one_big_batch(tiny_model, chat_jsonl, make_recipe, tmp_path):
    hf = tiny_model("llama")
    one = train(make_recipe(hf, chat_jsonl, steps=3), hf, tmp_path / "a")
    acc = train(make_recipe(hf, chat_jsonl, steps=3, micro_batch_size=1), hf, tmp_path / "b")
    assert_same_training(one, acc, tol=1e-5)


def test_resume_after_interrupt_reaches_the_same_loss(tiny_model, chat_jsonl, make_recipe, tmp_path):
    hf = tiny_model("llama")
    # dropout on: the resumed steps must also draw the same random numbers
    recipe = make_recipe(hf, chat_jsonl, steps=6, save_every=2, lora={"dropout": 0.1}, lr_schedule="cosine")
    full = train(recipe, hf, tmp_path / "full")

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(recipe, hf, out, on_step=interrupt)
    assert F.latest_checkpoint(out).name == "step-000002" and not (out / "adapter").exists()
    with pytest.raises(FinetuneError, match="pass --resume"):
        train(recipe, hf, out, resume=False)
    resumed = train(recipe, hf, out, resume=True)
    assert resumed.resumed_from == 2
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert resumed.final_loss == pytest.approx(full.final_loss, abs=1e-6)
    assert_same_training(full, resumed, tol=1e-6)


def test_resume_refuses_a_checkpoint_of_other_settings(tiny_model, chat_jsonl, make_recipe, tmp_path):
    hf = tiny_model("llama")
    out = tmp_path / "ft"

    def interrupt(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(make_recipe(hf, chat_jsonl), hf, out, on_step=interrupt)
    other = make_recipe(hf, chat_jsonl, lr=5e-3)
    with pytest.raises(FinetuneError, match="other data or settings"):
        train(other, hf, out, resume=True)
    result = train(other, hf, out, resume=None)  # what `build` does: a stale checkpoint is discarded
    assert result.resumed_from is None


class _Planted:
    """Unpickling this calls a function of its choice (here `open`, creating the marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("resume", [None, True])
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_a_planted_checkpoint_pickle_is_refused_not_run(tiny_model, chat_jsonl, make_recipe, tmp_path, resume,
                                                        writer):
    import pickle

    hf = tiny_model("llama")
    recipe = make_recipe(hf, chat_jsonl)
    out, marker = tmp_path / "ft", tmp_path / "pwned"
    ckpt = out / F.CHECKPOINTS / "step-000002"
    ckpt.mkdir(parents=True)
    state = {"run_id": F.run_fingerprint(recipe, "tiny"), "step": 2, "history": [], "x": _Planted(marker)}
    with open(ckpt / F.STATE_FILE, "wb") as f:
        torch.save(state, f) if writer == "torch" else pickle.dump(state, f)
    with pytest.raises(FinetuneError) as err:
        train(recipe, hf, out, resume=resume)
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and "refused, not unpickled" in message and str(ckpt / F.STATE_FILE) in message


def test_packing_and_gradient_checkpointing_train(tiny_model, chat_jsonl, make_recipe, tmp_path):
    hf = tiny_model("qwen2")
    recipe = make_recipe(hf, chat_jsonl, steps=4, packing=True, max_seq_len=128, batch_size=2,
                         micro_batch_size=1, gradient_checkpointing=True)
    result = train(recipe, hf, tmp_path / "ft")
    assert result.examples < 8  # rows of several examples
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_continued_pretraining_on_text_files(tiny_model, make_recipe, tmp_path):
    hf = tiny_model("mistral")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Zorb the robot lives on Mars and eats rocks. " * 30)
    recipe = make_recipe(hf, corpus, method="cpt", steps=5, max_seq_len=32)
    result = train(recipe, hf, tmp_path / "ft")
    assert result.method == "cpt" and result.history[-1]["loss"] < result.history[0]["loss"]


def test_target_module_the_model_lacks(tiny_model, chat_jsonl, make_recipe, tmp_path):
    hf = tiny_model("llama")
    recipe = make_recipe(hf, chat_jsonl, lora={"target_modules": ["q_proj", "c_attn"]})
    with pytest.raises(RecipeError) as err:
        train(recipe, hf, tmp_path / "ft")
    msg = str(err.value)
    assert f"{recipe.path}: finetune.lora.target_modules.1: this llama model has no layer 'c_attn'" in msg
    assert "q_proj" in msg and "\n" not in msg


def test_recipe_target_modules_override(tiny_model, chat_jsonl, make_recipe, tmp_path):
    hf = tiny_model("llama")
    result = train(make_recipe(hf, chat_jsonl, steps=1, lora={"target_modules": ["q_proj", "v_proj"]}), hf,
                   tmp_path / "ft")
    assert result.target_modules == 4
    keys = adapter_weights(result)
    assert keys and all(".q_proj." in k or ".v_proj." in k for k in keys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_qlora_without_cuda_suggests_lora(tiny_model, chat_jsonl, make_recipe, tmp_path):
    recipe = make_recipe(tiny_model("llama"), chat_jsonl, method="qlora")
    with pytest.raises(FinetuneError) as err:
        train(recipe, tiny_model("llama"), tmp_path / "ft")
    msg = str(err.value)
    assert "qlora needs a CUDA GPU" in msg and "--method lora" in msg and "\n" not in msg


def test_training_dtype_defaults(make_recipe, tiny_model, chat_jsonl):
    spec = make_recipe(tiny_model("llama"), chat_jsonl).finetune
    assert training_dtype(spec, "cpu") == torch.float32
    assert training_dtype(spec.model_copy(update={"dtype": "bfloat16"}), "cpu") == torch.bfloat16


def test_data_order_is_a_function_of_seed_and_step():
    a = [F.step_indices(s, 4, 10, seed=1) for s in range(5)]
    assert a == [F.step_indices(s, 4, 10, seed=1) for s in range(5)]
    flat = [i for step in a for i in step]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs
    assert a != [F.step_indices(s, 4, 10, seed=2) for s in range(5)]


def test_lr_schedules(make_recipe, tiny_model, chat_jsonl):
    spec = make_recipe(tiny_model("llama"), chat_jsonl, lr=1.0, warmup_steps=2, lr_schedule="cosine").finetune
    lrs = [F.lr_at(s, spec, 10) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0 and lrs[-1] < 0.1
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))


class _Stop(Exception):
    pass


def test_qlora_load_path_asks_for_nf4_on_the_processs_gpu(tiny_model, chat_jsonl, make_recipe, monkeypatch):
    """Past the CUDA check (faked): the base is requested in NF4, double-quantised, bf16 compute,
    on this process's GPU. The load itself needs a GPU, so it stops there."""
    import sys
    import types

    import transformers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    seen = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    from vishwamai_edge.train.lora import load_for_training

    spec = make_recipe(tiny_model("llama"), chat_jsonl, method="qlora").finetune
    with pytest.raises(_Stop):
        load_for_training(tiny_model("llama"), spec, torch.device("cuda", 1), "r.yaml")
    q = seen["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and seen["dtype"] == torch.bfloat16
    assert seen["device_map"] == {"": 1}


def test_qlora_optimizer_is_paged_adamw_8bit(make_recipe, tiny_model, chat_jsonl, monkeypatch):
    import sys
    import types

    from vishwamai_edge.train.lora import make_optimizer

    # bitsandbytes' paged optimizers need CUDA: record which class the QLoRA path builds, with what
    made = {}

    class PagedAdamW8bit:
        def __init__(self, params, **kw):
            made.update(params=list(params), **kw)

    bnb = types.ModuleType("bitsandbytes")
    bnb.optim = types.SimpleNamespace(PagedAdamW8bit=PagedAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    spec = make_recipe(tiny_model("llama"), chat_jsonl, method="qlora", lr=1e-4, weight_decay=0.01).finetune
    trainable = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer(spec, trainable), PagedAdamW8bit)
    assert made["lr"] == 1e-4 and made["weight_decay"] == 0.01 and made["params"] == trainable
    lora = make_recipe(tiny_model("llama"), chat_jsonl, method="lora", lr=1e-4).finetune
    assert isinstance(make_optimizer(lora, trainable), torch.optim.AdamW)  # plain LoRA: no bitsandbytes
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(FinetuneError, match="pip install bitsandbytes"):
        make_optimizer(spec, [])
