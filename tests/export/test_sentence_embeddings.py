"""The sentence-embedding export (export/onnx/sentence_embeddings.py) and its device side (runtime/embeddings.py):
the shipped all-MiniLM-L6-v2 (mean pooling, normalised) against sentence-transformers in fp32, fp16 and int8,
a tiny random BERT with CLS pooling and no normalisation, and the folders and texts it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from embedding_bundles import minilm_export  # noqa: F401

from vishwamai_edge.errors import InputError, SourceError
from vishwamai_edge.export.onnx.sentence_embeddings import LIMITS, export_sentence_embedder
from vishwamai_edge.runtime.embeddings import Embedder
from vishwamai_edge.sources.embedded import embedded_sentence_embedder

# other sentences than the build's own check, in one batch of very different lengths
SENTENCES = [
    "Replace the coolant filter every 500 operating hours.",
    "Why does the spindle stop when the door opens?",
    "x",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "Température de service: -20 °C à 60 °C; humidité relative < 95 %.",
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def minilm():
    return embedded_sentence_embedder()


@pytest.fixture(scope="module")
def reference(minilm):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm), device="cpu", local_files_only=True)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_minilm_equals_sentence_transformers(minilm_export, reference, dtype):
    folder, contract = minilm_export(dtype)
    assert (contract.pooling, contract.normalize, contract.max_tokens, contract.dim) == ("mean", True, 256, 384)
    assert contract.check["min_cosine"] >= LIMITS[dtype]["min_cosine"]
    embedder = Embedder.load(folder, threads=2)
    got = embedder.embed(SENTENCES)
    want = reference.encode(SENTENCES, convert_to_numpy=True)
    cos = cosines(got.astype(np.float64), want.astype(np.float64))
    # measured: fp32 1.0000000 (max |difference| 2e-7), fp16 0.99999, int8 0.987
    assert cos.min() >= LIMITS[dtype]["min_cosine"], cos
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    if dtype == "fp32":
        assert np.abs(got - want).max() < 1e-5
    saved = json.loads((folder / "embedding.json").read_text())
    assert saved["check"]["min_cosine"] == contract.check["min_cosine"]


def test_a_text_longer_than_the_window_is_refused(minilm_export):
    embedder = Embedder.load(minilm_export("fp32")[0], threads=2)
    with pytest.raises(InputError, match=r"the question is 3\d\d tokens long; the embedding model reads at most 256"):
        embedder.embed(["word " * 300], what="question")


@pytest.fixture
def tiny_bert(tmp_path):
    """A random 2-layer BERT with its own WordPiece vocabulary, saved as a sentence-transformers folder that asks
    for CLS pooling and no normalisation (bge's pooling, without its Normalize)."""
    import tiny_models
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(tiny_models.CORPUS * 4, trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", cls_id), ("[SEP]", sep_id)])
    out = tmp_path / "tiny-bert"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(out)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(out)
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling/config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                            "pooling_mode_cls_token": True}))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48, "do_lower_case": False}))
    return out


def test_cls_pooling_without_normalisation(tiny_bert, tmp_path):
    from sentence_transformers import SentenceTransformer

    contract = export_sentence_embedder(tiny_bert, tmp_path / "e", "fp32", threads=2)
    assert (contract.pooling, contract.normalize, contract.max_tokens) == ("cls", False, 48)
    texts = ["def add(a, b):", "hello world", "x"]
    got = Embedder.load(tmp_path / "e").embed(texts)
    want = SentenceTransformer(str(tiny_bert), device="cpu", local_files_only=True).encode(texts)
    assert np.abs(got - want).max() < 1e-5
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-2)  # the vectors were not normalised


def test_folders_that_are_no_sentence_model_fail_in_one_line(tiny_bert, tmp_path):
    (tiny_bert / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                 "pooling_mode_mean_tokens": True}))
    with pytest.raises(SourceError, match=r"one pooling mode is supported at a time .* asks for \['cls', 'mean'\]"):
        export_sentence_embedder(tiny_bert, tmp_path / "a")
    (tiny_bert / "modules.json").unlink()
    with pytest.raises(SourceError, match="is not a sentence-transformers folder \\(no modules.json\\)"):
        export_sentence_embedder(tiny_bert, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
