"""llama.cpp tokenizes exactly as the HF tokenizer, on text with Unicode, numbers,
whitespace runs and special tokens, and on each model's rendered chat template, for
each vocabulary kind the converter writes: byte-level BPE, SentencePiece (Llama 2 and
Gemma styles, chat markers inside the SentencePiece model) and SentencePiece stored
as tokenizer.json only."""

from __future__ import annotations

import json
import shutil

import gguf
import pytest
from tiny_models import GEMMA_TURN_MARKERS

from vishwamai_edge.errors import quiet_transformers
from vishwamai_edge.export.gguf import convert_hf_to_gguf
from vishwamai_edge.export.verify import SentencePieceReference, chat_check_prompt
from vishwamai_edge.runtime.backends.llamacpp import LlamaCppBackend
from vishwamai_edge.sources.gguf import hf_dir_from_gguf

TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "Numbers: 3.14159, 1,000,000 and 2026-11-23; 42nd",
    "Ünïcödé: naïve café, Straße, São Paulo, Ελληνικά, עברית, العربية",
    "中文分词测试：光合作用。日本語のテキスト。한국어 텍스트",
    "Emoji 🙂🚀🇮🇳 and symbols © ™ € ½ → ∑",
    "Tabs\tand\nnewlines\n\n\nand    runs   of spaces",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Special marker mid-sentence <|im_end|> then text",
    "नमस्ते दुनिया — Привет мир",
    "",
]

FAMILY_SPECIALS = {
    "llama": "<|begin_of_text|>", "qwen2": "<|endoftext|>", "mistral": "</s>",
    "gemma-chat": "<start_of_turn>", "gemma-spm-only": "<end_of_turn>", "mistral-json-only": "</s>",
}


def compare(hf_dir, gguf_path, texts):
    """(text, HF ids, llama.cpp ids) of each text, and of the rendered chat prompt, that differ."""
    tok = quiet_transformers().AutoTokenizer.from_pretrained(hf_dir)
    chat = chat_check_prompt(tok)
    assert chat is not None, f"{hf_dir} has no chat template"
    backend = LlamaCppBackend.load(gguf_path, n_ctx=256, n_threads=1)
    try:
        cases = [(text, True) for text in texts] + [(chat, False)]  # the template writes its own BOS
        mismatches = []
        for text, add_special in cases:
            want = list(tok(text, add_special_tokens=add_special)["input_ids"])
            got = backend.tokenize(text, add_special=add_special, parse_special=True)
            if got != want:
                mismatches.append((text, want, got))
        return mismatches
    finally:
        backend.close()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_tiny_tokenizers(tiny_model, tmp_path, family):
    hf_dir = tiny_model(family)
    gguf_path = convert_hf_to_gguf(hf_dir, tmp_path / "t.gguf", "f16").path
    texts = TEXTS + [f"{FAMILY_SPECIALS[family]}inline special"]
    assert compare(hf_dir, gguf_path, texts) == []


@pytest.mark.parametrize("variant", ["gemma-chat", "gemma-spm-only", "mistral-json-only"])
def test_sentencepiece_variants(tiny_variant, tmp_path, variant):
    """Chat markers that are pieces of the SentencePiece model (typed by tokenizer.json, or by the
    model's own USER_DEFINED pieces), and a SentencePiece BPE known only from tokenizer.json."""
    hf_dir = tiny_variant(variant)
    gguf_path = convert_hf_to_gguf(hf_dir, tmp_path / "t.gguf", "f16").path
    texts = TEXTS + [f"{FAMILY_SPECIALS[variant]}inline special", "text<start_of_turn>user\nhi<end_of_turn>"]
    assert compare(hf_dir, gguf_path, texts) == []


@pytest.mark.parametrize("variant", ["llama2-spm-only", "gemma-spm-only"])
def test_sentencepiece_only_follows_sentencepiece(tiny_variant, tmp_path, variant):
    """A folder with tokenizer.model only: llama.cpp tokenizes as SentencePiece itself (specials
    split out first, dummy prefix per piece of text), whatever transformers' own tokenizer does."""
    hf_dir = tiny_variant(variant)
    ref = SentencePieceReference(hf_dir)
    chat = chat_check_prompt(quiet_transformers().AutoTokenizer.from_pretrained(hf_dir))
    texts = TEXTS + ["x  * a list  * item", "  * first\n  * second", "text</s><s>[INST] hi [/INST]",
                     "text<start_of_turn>user\nhi<end_of_turn>"]
    gguf_path = convert_hf_to_gguf(hf_dir, tmp_path / "t.gguf", "f16").path
    backend = LlamaCppBackend.load(gguf_path, n_ctx=256, n_threads=1)
    try:
        cases = [(t, True) for t in texts] + [(chat, False)]
        assert [t for t, special in cases if backend.tokenize(t, add_special=special, parse_special=True)
                != ref.encode(t, add_special=special)] == []
    finally:
        backend.close()


@pytest.mark.e2e
def test_embedded_smollm2(embedded_build, embedded_hf_dir):
    f16 = embedded_build.bundle.parents[0] / "export" / "model-f16.gguf"
    assert compare(embedded_hf_dir, f16, TEXTS + ["<|endoftext|><repo_name>x<file_sep>"]) == []


def token_types(gguf_path, texts):
    reader = gguf.GGUFReader(gguf_path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    return {text: gguf.TokenType(types[tokens.index(text)]) for text in texts}


@pytest.mark.parametrize(
    ("variant", "kind"),
    [("gemma-chat", gguf.TokenType.CONTROL), ("gemma-spm-only", gguf.TokenType.USER_DEFINED)],
    ids=["special-added-tokens", "user-defined-pieces"],
)
def test_chat_markers_inside_sentencepiece_typed(tiny_variant, tmp_path, variant, kind):
    """tokenizer.json's special added tokens are CONTROL; else the model's USER_DEFINED pieces stay so."""
    gguf_path = convert_hf_to_gguf(tiny_variant(variant), tmp_path / "t.gguf", "f16").path
    assert token_types(gguf_path, GEMMA_TURN_MARKERS) == dict.fromkeys(GEMMA_TURN_MARKERS, kind)


def test_repurposed_piece_takes_added_token_text(tiny_variant, tmp_path):
    """A fine-tune that renames a piece of the SentencePiece model (here <mask>) in tokenizer.json only."""
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_variant("gemma-chat"), hf_dir)
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tok["model"]["vocab"]["<|im_start|>"] = tok["model"]["vocab"].pop("<mask>")
    for item in tok["added_tokens"]:
        if item["content"] == "<mask>":
            item["content"] = "<|im_start|>"
    (hf_dir / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    gguf_path = convert_hf_to_gguf(hf_dir, tmp_path / "t.gguf", "f16").path
    assert token_types(gguf_path, ["<|im_start|>"]) == {"<|im_start|>": gguf.TokenType.CONTROL}
    assert compare(hf_dir, gguf_path, ["<|im_start|>user\nhi", "a<|im_start|>b"]) == []


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_gguf_source_folder(tiny_model, tmp_path, family):
    """A GGUF source's HF folder (Mistral's: SentencePiece as tokenizer.json only) tokenizes as the
    original model does, and its own GGUF export as it does."""
    original = tiny_model(family)
    source = convert_hf_to_gguf(original, tmp_path / "a.gguf", "f32").path
    restored = hf_dir_from_gguf(source, tmp_path / "hf")
    hf = quiet_transformers().AutoTokenizer
    want, got = hf.from_pretrained(original), hf.from_pretrained(restored)
    texts = TEXTS + [f"{FAMILY_SPECIALS[family]}inline special", chat_check_prompt(want)]
    assert [t for t in texts if want(t)["input_ids"] != got(t)["input_ids"]] == []
    again = convert_hf_to_gguf(restored, tmp_path / "b.gguf", "f16").path
    assert compare(restored, again, texts) == []
