"""`method: align` on a tiny random LLM with the real EfficientNet-Lite0 (and a tiny CLIP tower):
stages, exact resume, the aligned folder, its ONNX export against torch, and the user errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
import yaml
from align_helpers import assert_resumes_exactly
from ft_helpers import write_jsonl
from PIL import Image
from rich.console import Console
from safetensors.torch import save_file

from vishwamai_edge.errors import UserError
from vishwamai_edge.export.onnx import export_vision
from vishwamai_edge.recipe import Recipe
from vishwamai_edge.train import data as D
from vishwamai_edge.train.align import ALIGNED, align
from vishwamai_edge.train.shapes import COLOURS, HELD_OUT, KINDS, SHAPES, combinations, named, write_shapes
from vishwamai_edge.train.aligned_folder import load_aligned, read_info
from vishwamai_edge.train.projector import make_projector, pooling_matrix

QUIET = Console(stderr=True, quiet=True)
CLI = [sys.executable, "-m", "vishwamai_edge.cli"]


def spec(tmp_path, llm_dir, **finetune) -> dict:
    ft = {"method": "align", "dataset": {"shapes": {"train": 12, "eval": 6, "size": 64}}, "steps": 4,
          "batch_size": 4, "micro_batch_size": 2, "max_seq_len": 128, "lr": 1e-3, "save_every": 1,
          "keep_checkpoints": 10, "lora": {"r": 4, "alpha": 8},
          "align": {"projector": {"tokens": 4}, "stage2_steps": 2}}
    ft.update(finetune)
    return {"name": "tiny-vlm", "source": {"kind": "hf", "path": str(llm_dir)}, "finetune": ft}


def recipe(tmp_path, llm_dir, **finetune) -> Recipe:
    r = Recipe.model_validate(spec(tmp_path, llm_dir, **finetune))
    r.path = tmp_path / "tiny-vlm.yaml"
    return r




def test_shapes_split_by_combination_and_reproducible(tmp_path):
    assert len(HELD_OUT) == 6 and all(c in COLOURS and s in SHAPES for c, s in HELD_OUT)
    train = combinations(held_out=False)
    assert {c for c, _ in train} == set(COLOURS) and {s for _, s in train} == set(KINDS)
    assert all((c, s) in train for c in COLOURS for s in KINDS if s not in SHAPES)  # extra kinds: every colour
    a = write_shapes(tmp_path / "a", 24, 6, seed=3, size=48)
    b = write_shapes(tmp_path / "b", 24, 6, seed=3, size=48)
    assert a.train.read_text() == b.train.read_text()
    assert (a.root / "images/train-00007.png").read_bytes() == (b.root / "images/train-00007.png").read_bytes()
    rows = [json.loads(x) for x in a.eval.read_text().splitlines()]
    assert {(r["colour"], r["shape"]) for r in rows} == set(HELD_OUT)
    assert not {(json.loads(x)["colour"], json.loads(x)["shape"]) for x in a.train.read_text().splitlines()} & HELD_OUT
    c = write_shapes(tmp_path / "c", 24, 6, seed=4, size=48)
    assert c.train.read_text() != a.train.read_text() or \
        (c.root / "images/train-00000.png").read_bytes() != (a.root / "images/train-00000.png").read_bytes()


def test_an_answer_names_one_colour_or_kind():
    assert named("It is red.", "colour") == "red"
    assert named("It is red and blue.", "colour") is None
    assert named("It is a star.", "shape") == "star"  # a wrong kind is named, not ignored
    assert named("No idea.", "shape") is None


def test_pooling_matrix_averages_adaptive_bins():
    m = pooling_matrix((7, 7), 4)  # 7 cells into 2 bins: 0..3 and 3..6 (overlapping on 3, as adaptive pooling)
    x = torch.randn(1, 49, 5)
    want = torch.nn.functional.adaptive_avg_pool2d(x.transpose(1, 2).reshape(1, 5, 7, 7), 2).flatten(2).transpose(1, 2)
    assert torch.allclose(m @ x, want, atol=1e-6)
    assert torch.allclose(m.sum(1), torch.ones(4))


def test_stages_resume_exactly_and_write_the_aligned_folder(tiny_model, tmp_path):
    llm_dir = tiny_model("llama")
    r = recipe(tmp_path, llm_dir)
    full = align(r, llm_dir, tmp_path / "full", "run", console=QUIET)
    assert full.steps == 6 and [h["stage"] for h in full.history] == [1, 1, 1, 1, 2, 2]
    assert full.target_modules > 0 and full.eval_loss is not None
    folder = tmp_path / "full" / ALIGNED
    info = read_info(folder)
    assert info["projector"] == {"depth": 2, "tokens": 4, "grid": [14, 14], "in_dim": 80, "hidden": 64,
                                 "out_dim": 64, "activation": "gelu"}
    assert info["encoder"]["family"] == "efficientnet-lite0"
    tok = transformers.AutoTokenizer.from_pretrained(folder / "llm")
    assert tok.convert_tokens_to_ids("<image>") == info["image_token"]["id"]
    assert "training" in info and info["training"]["merge_check"]["max_abs_diff"] < 0.1
    # the LLM changed in stage 2 (LoRA merged), the encoder did not
    base = transformers.AutoModelForCausalLM.from_pretrained(llm_dir).state_dict()
    tuned = transformers.AutoModelForCausalLM.from_pretrained(folder / "llm").state_dict()
    assert any((base[k] - tuned[k]).abs().max() > 1e-6 for k in base if "q_proj" in k)

    # interrupted in stage 1 and again in stage 2, resumed each time: the same weights at the end
    assert_resumes_exactly(r, llm_dir, tmp_path, folder)


def test_stage_one_leaves_the_llm_as_it_was(tiny_model, tmp_path):
    llm_dir = tiny_model("llama")
    r = recipe(tmp_path, llm_dir, steps=2, align={"projector": {"tokens": 1, "depth": 1}, "stage2_steps": 0})
    align(r, llm_dir, tmp_path / "s1", "run", console=QUIET)
    base = transformers.AutoModelForCausalLM.from_pretrained(llm_dir).state_dict()
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s1" / ALIGNED / "llm").state_dict()
    for k, v in base.items():
        rows = v.shape[0]
        assert torch.equal(tuned[k][:rows], v), k  # embeddings gained one row (<image>); nothing else moved


def test_stage_one_against_the_quantized_llm(tiny_model, tmp_path):
    """quantized_llm: training sees the LLM as llama.cpp runs the bundle's quantization of it (the bundle's
    logits sit much closer to it than to the source), and the folder keeps the source's own weights."""
    from vishwamai_edge.export.gguf import convert_hf_to_gguf
    from vishwamai_edge.export.quantize import quantize_gguf
    from vishwamai_edge.runtime.backends import TokenSegment
    from vishwamai_edge.runtime.backends.llamacpp import LlamaCppBackend
    from vishwamai_edge.stages.finetune import quantized_weights
    from vishwamai_edge.train.align import load_quantized_llm

    llm_dir = tiny_model("llama")
    data = spec(tmp_path, llm_dir, steps=2, align={"projector": {"tokens": 1, "depth": 1}, "stage2_steps": 0,
                                                   "quantized_llm": "q4_k_m"})
    r = Recipe.model_validate({**data, "export": {"gguf": {"quants": ["q4_k_m"], "imatrix": False}}})
    r.path = tmp_path / "tiny-vlm.yaml"

    ids = list(range(3, 40))
    (tmp_path / "q").mkdir()
    weights = quantized_weights(r, llm_dir, tmp_path / "q")
    quantized = load_quantized_llm(llm_dir, weights(), torch.float32).eval()
    source = transformers.AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    assert not list((tmp_path / "q").iterdir())  # its files are gone once it is loaded
    with torch.no_grad():
        want_q = quantized(torch.tensor([ids])).logits[0, -1].numpy()
        want_src = source(torch.tensor([ids])).logits[0, -1].numpy()
    f16 = convert_hf_to_gguf(llm_dir, tmp_path / "f16.gguf", "f16").path
    quantize_gguf(f16, tmp_path / "q4.gguf", "q4_k_m")
    backend = LlamaCppBackend.load(tmp_path / "q4.gguf", n_ctx=64, n_threads=2)
    backend.prefill([TokenSegment(ids)])
    got = backend.logits()[: len(want_q)]
    backend.close()
    to_quantized, to_source = np.abs(got - want_q).max(), np.abs(got - want_src).max()
    assert to_quantized < to_source / 4, (to_quantized, to_source)

    result = align(r, llm_dir, tmp_path / "s1", "run", console=QUIET, quantized_weights=weights)
    assert read_info(tmp_path / "s1" / ALIGNED)["training"]["quantized_llm"] == "q4_k_m"
    assert result.steps == 2
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s1" / ALIGNED / "llm").state_dict()
    for k, v in transformers.AutoModelForCausalLM.from_pretrained(llm_dir).state_dict().items():
        assert torch.equal(tuned[k][: v.shape[0]], v), k  # the source's weights, one <image> row more


def test_aligned_export_matches_torch_in_every_dtype(tiny_model, tmp_path):
    llm_dir = tiny_model("llama")
    r = recipe(tmp_path, llm_dir, steps=1, align={"projector": {"tokens": 16}, "stage2_steps": 0})
    align(r, llm_dir, tmp_path / "a", "run", console=QUIET)
    folder = tmp_path / "a" / ALIGNED
    for dtype, rel in (("fp32", 1e-4), ("fp16", 3e-2), ("int8", 0.1)):
        info = export_vision(folder, tmp_path / f"vision-{dtype}.onnx", dtype, threads=2)
        assert (info.n_tokens, info.hidden, info.image_size) == (16, 64, (224, 224))
        assert info.check["max_rel_diff"] < rel
        assert info.preprocess["pad_to_square"] is True


def test_clip_tower_from_an_hf_folder(tiny_model, tmp_path):
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    transformers.CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    llm_dir = tiny_model("llama")
    r = recipe(tmp_path, llm_dir, steps=1, align={
        "encoder": {"kind": "hf", "path": str(tmp_path / "clip"), "feature_layer": -2},
        "projector": {"tokens": 16}, "stage2_steps": 0})
    align(r, llm_dir, tmp_path / "c", "run", console=QUIET)
    aligned = load_aligned(tmp_path / "c" / ALIGNED)
    assert aligned.encoder.grid == (4, 4) and aligned.encoder.dim == 32  # CLS dropped: 16 patches
    info = export_vision(tmp_path / "c" / ALIGNED, tmp_path / "clip.onnx", "fp32", threads=2)
    assert info.n_tokens == 16 and info.check["max_rel_diff"] < 1e-4


# -- user errors: one line, naming the file and line or the field -----------------------------------
def image_rows(image: str) -> list[dict]:
    return [{"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": "Colour?"}]},
                          {"role": "assistant", "content": "Red."}]}]


def test_a_missing_or_broken_image_names_the_line(tiny_model, tmp_path):
    llm_dir = tiny_model("llama")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:40])
    for name, message in (("gone.png", "does not exist"), ("broken.png", "is not a readable image"),
                          ("cut.png", "is not a readable image")):
        data = write_jsonl(tmp_path / f"{name}.jsonl", image_rows("ok.png") + image_rows(name))
        r = recipe(tmp_path, llm_dir, dataset={"train": str(data)})
        with pytest.raises(D.DatasetError) as err:
            align(r, llm_dir, tmp_path / "x", "run", console=QUIET)
        text = str(err.value)
        assert f"{data}:2" in text and name in text and message in text and "\n" not in text


def test_unknown_encoder_and_wrong_projector_width(tiny_model, tmp_path):
    llm_dir = tiny_model("llama")
    r = recipe(tmp_path, llm_dir, align={"encoder": {"kind": "hf", "path": str(llm_dir)}})
    with pytest.raises(UserError, match=r"finetune.align.encoder.path: .* holds a 'llama' model; align takes"):
        align(r, llm_dir, tmp_path / "x", "run", console=QUIET)
    torch.manual_seed(0)
    other = make_projector(80, 32, (14, 14), 4)  # for an LLM 32 wide; the tiny one is 64
    save_file(dict(other.state_dict()), str(tmp_path / "p.safetensors"))
    r = recipe(tmp_path, llm_dir, align={"projector": {"tokens": 4, "init": str(tmp_path / "p.safetensors")}})
    with pytest.raises(UserError, match=r"finetune.align.projector.init: .* width 32 .* needs width 64"):
        align(r, llm_dir, tmp_path / "y", "run", console=QUIET)


def test_recipe_field_errors_exit_2_with_one_line(tiny_model, tmp_path):
    llm_dir = tiny_model("llama")
    bad = spec(tmp_path, llm_dir, align={"projector": {"tokens": 5}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = subprocess.run([*CLI, "finetune", "--recipe", str(path), "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "finetune.align.projector.tokens" in out.stderr and "square" in out.stderr
    assert "Traceback" not in out.stderr
    bad = spec(tmp_path, llm_dir, align={"encoder": {"kind": "hf", "path": str(llm_dir)}})
    path.write_text(yaml.safe_dump(bad))
    out = subprocess.run([*CLI, "finetune", "--recipe", str(path), "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "holds a 'llama' model" in out.stderr and "Traceback" not in out.stderr


def test_shared_prefix_ids_stop_before_the_image_and_the_answer():
    from vishwamai_edge.train.align import shared_prefix_ids

    ig = D.IGNORE
    a = D.Example(input_ids=[1, 2, 3, 9, 9, 4, 5], labels=[ig, ig, ig, ig, ig, ig, 5])
    b = D.Example(input_ids=[1, 2, 3, 9, 9, 6, 7], labels=[ig, ig, ig, ig, ig, ig, 7])
    assert shared_prefix_ids([a, b], placeholder=9) == [1, 2, 3]
    c = D.Example(input_ids=[1, 2, 8, 9, 9, 6], labels=[ig, ig, ig, ig, ig, 6])
    assert shared_prefix_ids([a, b, c], placeholder=9) == [1, 2]  # up to the first difference
    text = D.Example(input_ids=[1, 2, 3, 4], labels=[ig, 2, 3, 4])
    assert shared_prefix_ids([text], placeholder=9) == [1]  # no loss inside the prefix
    packed = D.Example(input_ids=[1, 2, 3], labels=[ig, ig, 3], position_ids=[0, 1, 0])
    assert shared_prefix_ids([packed], placeholder=9) == []


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_stage_one_from_the_shared_prefix_cache_equals_the_whole_forward(tiny_model, tmp_path, family,
                                                                          monkeypatch):
    """Stage 1 runs each step from the cached system prompt: its loss and projector gradient equal the
    whole sequence's (what the speed costs: nothing)."""
    from vishwamai_edge.train.align import AlignProcessor, _loss_sum, _prefix_for, add_image_token
    from vishwamai_edge.train.finetune import prepare_examples, read_records
    from vishwamai_edge.train import encoders as E
    from vishwamai_edge.train.aligned_folder import image_chat_template

    llm_dir = tiny_model(family)
    r = recipe(tmp_path, llm_dir)
    llm = transformers.AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(llm_dir)
    image = add_image_token(tok, llm, "<image>")
    tok.chat_template = image_chat_template(tok.chat_template, "<image>", "image")
    tok.pad_token = tok.pad_token or tok.eos_token
    encoder = E.load_pretrained("efficientnet-lite0", None, None)
    torch.manual_seed(0)
    projector = make_projector(encoder.dim, llm.config.hidden_size, encoder.grid, 4)
    train, _, _ = prepare_examples(r, read_records(r, tmp_path), tok,
                                   AlignProcessor(tok, tok.chat_template, "<image>", 4, encoder))
    prefix = _prefix_for(llm, projector, train, tok.pad_token_id, image["id"], "cpu", QUIET)
    assert prefix is not None and prefix.length >= 2
    # the check can fail: a cache that is not the prefix's (here its values zeroed) is refused
    real = prefix.layers
    prefix.layers = [(k, torch.zeros_like(v)) for k, v in real]
    monkeypatch.setattr("vishwamai_edge.train.align.SharedPrefix.__init__", lambda self, *a: self.__dict__.update(
        prefix.__dict__))
    said = Console(file=io.StringIO(), width=200)
    assert _prefix_for(llm, projector, train, tok.pad_token_id, image["id"], "cpu", said) is None
    assert "training on whole sequences" in said.file.getvalue()
    prefix.layers = real
    batch = D.collate(train[:4], tok.pad_token_id)
    batch.pop("n_tokens")
    grads = []
    for p in (None, prefix):
        projector.zero_grad()
        loss = _loss_sum(llm, projector, batch, image["id"], "cpu", p)
        loss.backward()
        grads.append((loss.item(), [q.grad.clone() for q in projector.parameters()]))
    (whole, g1), (cached, g2) = grads
    assert abs(whole - cached) <= 1e-4 * abs(whole)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(g1, g2))
