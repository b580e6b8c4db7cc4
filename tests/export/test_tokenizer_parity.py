"""llama.cpp tokenizes exactly as the HF tokenizer, on text with Unicode, numbers,
whitespace runs and special tokens, for each vocabulary kind the converter writes."""

from __future__ import annotations

import pytest

from vishwamai_edge.errors import quiet_transformers
from vishwamai_edge.export.gguf import convert_hf_to_gguf
from vishwamai_edge.runtime.backends.llamacpp import LlamaCppBackend

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

FAMILY_SPECIALS = {"llama": "<|begin_of_text|>", "qwen2": "<|endoftext|>", "mistral": "</s>"}


def compare(hf_dir, gguf_path, texts):
    tok = quiet_transformers().AutoTokenizer.from_pretrained(hf_dir)
    backend = LlamaCppBackend.load(gguf_path, n_ctx=256, n_threads=1)
    try:
        mismatches = []
        for text in texts:
            want = list(tok(text, add_special_tokens=True)["input_ids"])
            got = backend.tokenize(text, add_special=True, parse_special=True)
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


@pytest.mark.e2e
def test_embedded_smollm2(embedded_build, embedded_hf_dir):
    f16 = embedded_build.bundle.parents[0] / "export" / "model-f16.gguf"
    assert compare(embedded_hf_dir, f16, TEXTS + ["<|endoftext|><repo_name>x<file_sep>"]) == []
