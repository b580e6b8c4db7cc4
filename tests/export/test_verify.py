"""The GGUF check against torch: its tokenizer agreement covers the rendered chat template."""

from __future__ import annotations

import gguf
import pytest
from tiny_models import GEMMA_TURN_MARKERS

from vishwamai_edge.errors import quiet_transformers
from vishwamai_edge.export.gguf import convert_hf_to_gguf
from vishwamai_edge.export.verify import (
    CHAT_CHECK_MESSAGES,
    SentencePieceReference,
    TorchReference,
    chat_check_prompt,
    check_gguf,
)
from vishwamai_edge.recipe import DEFAULT_VERIFY_PROMPTS


def test_chat_prompt_rendered_by_the_template(tiny_variant):
    tok = quiet_transformers().AutoTokenizer.from_pretrained(tiny_variant("gemma-chat"))
    chat = chat_check_prompt(tok)
    assert chat.startswith("<bos><start_of_turn>user\n") and chat.endswith("<start_of_turn>model\n")
    assert all(m["content"] in chat for m in CHAT_CHECK_MESSAGES)


def test_tokenizer_check_sees_chat_markers(tiny_variant, tmp_path, monkeypatch):
    """Chat markers written as NORMAL tokens are spelled out by llama.cpp; no plain prompt shows it."""
    hf_dir = tiny_variant("gemma-chat")
    reference = TorchReference(hf_dir)
    marker_ids = set(reference.tokenizer.convert_tokens_to_ids(GEMMA_TURN_MARKERS))
    write_types = gguf.GGUFWriter.add_token_types

    def markers_normal(self, types):
        write_types(self, [gguf.TokenType.NORMAL if i in marker_ids else t for i, t in enumerate(types)])

    monkeypatch.setattr(gguf.GGUFWriter, "add_token_types", markers_normal)
    out = convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf", "f16")
    check = check_gguf(reference, out.path, DEFAULT_VERIFY_PROMPTS, n_threads=2)
    assert check.tokenizer_agreement == len(DEFAULT_VERIFY_PROMPTS) / (len(DEFAULT_VERIFY_PROMPTS) + 1), check
    assert check.top1_agreement == 1.0, check  # the logits check itself is unaffected


# Text on which the tokenizer transformers builds from tokenizer.model alone differs from
# SentencePiece (a leading space, runs of spaces before a piece), and the Llama 2 chat markers.
SPM_TEXTS = [
    " leading space and trailing space ",
    "x  * a list  * item",
    "  * first\n  * second\n    * nested",
    "Tabs\tand\nnewlines\n\n\nand    runs   of spaces",
    "text</s><s>[INST] hi [/INST]",
]


def test_sentencepiece_reference_splits_specials_as_llama_cpp(tiny_variant):
    """Special tokens matched whole; the text between them encoded by SentencePiece, each piece
    with its dummy prefix (llama.cpp prefixes a space at the start and after every special token)."""
    import sentencepiece as spm

    hf_dir = tiny_variant("llama2-spm-only")
    ref = SentencePieceReference(hf_dir)
    sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    assert ref.partition("a</s><s>[INST] b") == ["a", 2, 1, "[INST] b"]
    want = [1, *sp.encode("a"), 2, 1, *sp.encode("[INST] b")]
    assert ref.encode("a</s><s>[INST] b", add_special=True) == want
    assert ref.encode("x  *", add_special=False) == sp.encode("x  *")
    assert ref.encode("", add_special=True) == [1]


def test_sentencepiece_only_folder_checked_against_sentencepiece(tiny_variant, tmp_path):
    """tokenizer.model only (older Llama 2 / Vicuna folders, VILA's llm/): llama.cpp follows
    SentencePiece, transformers' own tokenizer does not; the check takes SentencePiece."""
    hf_dir = tiny_variant("llama2-spm-only")
    assert not (hf_dir / "tokenizer.json").exists()
    reference = TorchReference(hf_dir)
    chat = chat_check_prompt(reference.tokenizer)
    assert chat.startswith("<s>[INST] ") and "</s><s>[INST] " in chat
    prompts = DEFAULT_VERIFY_PROMPTS + SPM_TEXTS
    assert any(reference.hf_token_ids(t) != reference.token_ids(t) for t in prompts)  # HF does differ
    out = convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf", "f16")
    check = check_gguf(reference, out.path, prompts, n_threads=2)
    assert check.tokenizer_reference == "sentencepiece" and check.tokenizer_kind == "sentencepiece", check
    assert check.tokenizer_agreement == 1.0, check
    assert check.hf_tokenizer_agreement < 1.0, check  # recorded, not failed
    assert check.top1_agreement == 1.0 and check.max_abs_diff < 1e-2, check


def _bos_normal(monkeypatch, reference):
    bos, write = reference.spm.bos_id, gguf.GGUFWriter.add_token_types
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_types", lambda self, types: write(
        self, [gguf.TokenType.NORMAL if i == bos else t for i, t in enumerate(types)]))


def _no_space_prefix(monkeypatch, reference):
    write = gguf.GGUFWriter.add_add_space_prefix
    monkeypatch.setattr(gguf.GGUFWriter, "add_add_space_prefix", lambda self, value: write(self, False))


@pytest.mark.parametrize(
    "break_vocab", [_bos_normal, _no_space_prefix], ids=["bos-normal", "no-space-prefix"]
)
def test_sentencepiece_check_still_fails_on_a_wrong_vocab(tiny_variant, tmp_path, monkeypatch, break_vocab):
    """<s> written NORMAL (llama.cpp spells it out in the rendered chat; not </s>, which llama.cpp
    types CONTROL by itself), or the dummy prefix dropped: the check sees it."""
    hf_dir = tiny_variant("llama2-spm-only")
    reference = TorchReference(hf_dir)
    break_vocab(monkeypatch, reference)
    out = convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf", "f16")
    check = check_gguf(reference, out.path, DEFAULT_VERIFY_PROMPTS, n_threads=2)
    k = len(DEFAULT_VERIFY_PROMPTS)
    assert check.tokenizer_agreement == (k / (k + 1) if break_vocab is _bos_normal else 0.0), check
