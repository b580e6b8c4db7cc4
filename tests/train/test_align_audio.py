"""`method: align` with an audio encoder: a tiny random Whisper encoder, a frame-stacking projector and
a tiny random LLM; audio parts in the chat JSONL. Stages, exact resume, the aligned folder, the
ONNX export of encoder + projector against torch, and the user errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from align_helpers import QUIET, assert_resumes_exactly
from ft_helpers import write_jsonl
from safetensors.torch import save_file
from whisper_models import build_tiny_whisper_encoder_folder, write_tone

from vishwamai_edge.errors import UserError
from vishwamai_edge.recipe import Recipe
from vishwamai_edge.train import data as D
from vishwamai_edge.train.align import ALIGNED, align
from vishwamai_edge.train.aligned_folder import load_aligned, read_info
from vishwamai_edge.train.projector import make_projector

STACK = 10  # 1500 Whisper frames -> 150 rows per clip



@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    return build_tiny_whisper_encoder_folder(tmp_path_factory.mktemp("whisper-enc"))


def tone_rows(folder: Path, n: int = 8) -> list[dict]:
    """Low tones are answered "Low.", high ones "High."; each clip a file next to the JSONL."""
    rows = []
    for i in range(n):
        high = i % 2 == 1
        name = f"tone-{i}.wav"
        write_tone(folder / name, 1800.0 + 40 * i if high else 220.0 + 20 * i, seconds=0.5 + 0.1 * i, seed=i)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "audio", "audio": name}, {"type": "text", "text": "Pitch?"}]},
            {"role": "assistant", "content": "High." if high else "Low."}]})
    return rows


def spec(llm_dir: Path, whisper: Path, data: Path, **align_over) -> dict:
    a = {"encoder": {"kind": "whisper", "path": str(whisper)}, "projector": {"stack": STACK}, "stage2_steps": 2}
    a.update(align_over)
    return {"name": "tiny-audio", "source": {"kind": "hf", "path": str(llm_dir)}, "finetune": {
        "method": "align", "dataset": {"train": str(data), "eval_fraction": 0.25}, "steps": 4, "batch_size": 2,
        "micro_batch_size": 1, "max_seq_len": 256, "lr": 1e-3, "save_every": 1, "keep_checkpoints": 10,
        "lora": {"r": 4, "alpha": 8}, "align": a}}


def recipe(tmp_path, llm_dir, whisper, data, **align_over) -> Recipe:
    r = Recipe.model_validate(spec(llm_dir, whisper, data, **align_over))
    r.path = tmp_path / "tiny-audio.yaml"
    return r



def test_audio_align_stages_resume_exactly_and_write_the_folder(tiny_model, whisper_dir, tmp_path):
    llm_dir = tiny_model("llama")
    data = write_jsonl(tmp_path / "tones.jsonl", tone_rows(tmp_path))
    r = recipe(tmp_path, llm_dir, whisper_dir, data)
    full = align(r, llm_dir, tmp_path / "full", "run", console=QUIET)
    assert full.steps == 6 and [h["stage"] for h in full.history] == [1, 1, 1, 1, 2, 2]
    folder = tmp_path / "full" / ALIGNED
    info = read_info(folder)
    assert info["encoder"]["family"] == "whisper" and info["encoder"]["modality"] == "audio"
    assert info["encoder"]["n_mels"] == 80 and info["encoder"]["n_frames"] == 3000
    assert info["projector"] == {"depth": 2, "tokens": 150, "grid": [1500, 1], "in_dim": 32, "hidden": 64,
                                 "out_dim": 64, "activation": "gelu", "stack": STACK}
    assert info["audio_token"]["text"] == "<audio>" and "image_token" not in info
    aligned = load_aligned(folder)
    assert aligned.modality == "audio" and aligned.projector.tokens == 150
    with torch.no_grad():  # the stacked projector: row i reads frames 10i .. 10i+9, concatenated
        feats = torch.randn(1, 1500, 32)
        p = aligned.projector
        for i in (0, 77, 149):
            manual = p.layers[1](torch.nn.functional.gelu(p.layers[0](feats[0, 10 * i:10 * i + 10].reshape(320))))
            assert torch.allclose(p(feats)[0, i], manual, atol=1e-5)

    # interrupted in stage 1 and again in stage 2, resumed each time: the same weights at the end
    assert_resumes_exactly(r, llm_dir, tmp_path, folder)


def test_stacking_pads_the_last_row_with_zero_frames():
    torch.manual_seed(0)
    p = make_projector(4, 6, (1500, 1), 188, depth=1, stack=8)  # Ultravox's 8: 1500 frames -> 188 rows
    feats = torch.randn(1, 1500, 4)
    last = torch.cat([feats[0, 1496:].reshape(16), torch.zeros(16)])
    with torch.no_grad():
        assert torch.allclose(p(feats)[0, -1], p.layers[0](last), atol=1e-6)
    with pytest.raises(ValueError, match="1500 frames stacked 8 at a time give 188 rows, not 190"):
        make_projector(4, 6, (1500, 1), 190, stack=8)


def test_a_file_that_is_not_audio_names_the_line(tiny_model, whisper_dir, tmp_path):
    llm_dir = tiny_model("llama")
    rows = tone_rows(tmp_path, 2)
    (tmp_path / "notes.wav").write_text("not audio at all")
    write_tone(tmp_path / "long.wav", 440.0, seconds=31.0)
    for name, message in (("notes.wav", "is not readable audio"), ("gone.wav", "does not exist"),
                          ("long.wav", "takes up to 30 s")):
        bad = {"messages": [{"role": "user", "content": [{"type": "audio", "audio": name}]},
                            {"role": "assistant", "content": "Low."}]}
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows + [bad])
        with pytest.raises(D.DatasetError) as err:
            align(recipe(tmp_path, llm_dir, whisper_dir, data), llm_dir, tmp_path / "x", "run", console=QUIET)
        text = str(err.value)
        assert f"{data}:3" in text and name in text and message in text and "\n" not in text, text


def test_projector_width_mismatch_and_recipe_fields(tiny_model, whisper_dir, tmp_path):
    llm_dir = tiny_model("llama")
    data = write_jsonl(tmp_path / "tones.jsonl", tone_rows(tmp_path, 2))
    torch.manual_seed(0)
    other = make_projector(32, 48, (1500, 1), 150, stack=STACK)  # for an LLM 48 wide; the tiny one is 64
    save_file(dict(other.state_dict()), str(tmp_path / "p.safetensors"))
    r = recipe(tmp_path, llm_dir, whisper_dir, data, projector={"stack": STACK, "init": str(tmp_path / "p.safetensors")})
    with pytest.raises(UserError, match=r"finetune.align.projector.init: .* width 48 .* needs width 64"):
        align(r, llm_dir, tmp_path / "y", "run", console=QUIET)
    with pytest.raises(ValueError, match="projector.tokens: an audio projector"):
        Recipe.model_validate(spec(llm_dir, whisper_dir, data, projector={"tokens": 16}))
    with pytest.raises(ValueError, match="projector.stack: frame stacking is for audio"):
        Recipe.model_validate(spec(llm_dir, whisper_dir, data, encoder={"kind": "efficientnet-lite0"}))
    r = recipe(tmp_path, llm_dir, llm_dir, data)  # a llama folder given as the Whisper encoder
    with pytest.raises(UserError, match=r"finetune.align.encoder.path: .* holds a 'llama' model; encoder kind whisper"):
        align(r, llm_dir, tmp_path / "z", "run", console=QUIET)


def test_audio_parts_need_an_audio_encoder(tiny_model, tmp_path):
    """A text fine-tune or an image align given audio parts: a one-line error naming the line."""
    from vishwamai_edge.train.data import Record, encode_chat

    rec = Record("set.jsonl:4", messages=tone_rows(tmp_path, 1)[0]["messages"], base_dir=tmp_path)
    with pytest.raises(D.DatasetError, match=r"set.jsonl:4: has audio, but the model has no audio encoder"):
        encode_chat(rec, None)


def test_audio_export_matches_torch(tiny_model, whisper_dir, tmp_path):
    from vishwamai_edge.export.onnx.audio import export_audio

    llm_dir = tiny_model("llama")
    data = write_jsonl(tmp_path / "tones.jsonl", tone_rows(tmp_path, 2))
    r = recipe(tmp_path, llm_dir, whisper_dir, data, stage2_steps=0)
    align(r.model_copy(update={"finetune": r.finetune.model_copy(update={"steps": 1})}), llm_dir, tmp_path / "a",
          "run", console=QUIET)
    folder = tmp_path / "a" / ALIGNED
    for dtype, rel in (("fp32", 1e-4), ("fp16", 1e-2)):
        info = export_audio(folder, tmp_path / f"audio-{dtype}.onnx", dtype, threads=2)
        print(dtype, info.check)
        assert (info.n_tokens, info.hidden, info.n_mels, info.n_frames, info.stack) == (150, 64, 80, 3000, STACK)
        assert info.check["clips"] == 4 and info.check["max_rel_diff"] < rel
    with pytest.raises(UserError, match="reads images, not audio"):  # an image aligned folder
        img = Recipe.model_validate({"name": "img", "source": {"kind": "hf", "path": str(llm_dir)}, "finetune": {
            "method": "align", "dataset": {"shapes": {"train": 12, "eval": 6, "size": 64}}, "steps": 1,
            "batch_size": 2, "micro_batch_size": 2, "align": {"projector": {"tokens": 1, "depth": 1}}}})
        img.path = tmp_path / "img.yaml"
        align(img, llm_dir, tmp_path / "img", "run", console=QUIET)
        export_audio(tmp_path / "img" / ALIGNED, tmp_path / "x.onnx")
