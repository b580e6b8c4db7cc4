"""Tiny random models and tokenizers of each family, built from configs (no hub access).

Tokenizers are trained here on a small multilingual corpus, one per family
style: Llama 3 (llama-bpe regex, BOS added), Qwen2 (its own regex; transformers
forces the Qwen2 tokenizer class on qwen2 models) and SentencePiece with byte
fallback (Llama 2 / Mistral / TinyLlama), with a Gemma variant whose chat markers
are pieces inside the SentencePiece model and one stored as tokenizer.json only.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1969, 3 astronauts travelled 384,400 km to the Moon and back.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 40))",
    "Les élèves étudient la photosynthèse à l'école.",
    "Der Bäcker backt 12 Brötchen für die Straße.",
    "光合作用是植物利用光能的过程。",
    "東京は日本の首都です。",
    "Привет, как дела? Всё хорошо.",
    "नमस्ते, आप कैसे हैं?",
    "Emoji: 🙂🚀 and symbols like ©, ™, € and ½.",
    "   leading spaces, tabs\tand\nnew lines\n\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 -42 1e-5",
    "Edge devices like the Jetson Orin run quantized language models.",
] * 20

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_bpe_tokenizer(out: Path, style: str, vocab_size: int = 600) -> Path:
    """A byte-level BPE tokenizer.json in the `style` of 'llama3' or 'qwen2'."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out.mkdir(parents=True, exist_ok=True)
    regex = {"llama3": LLAMA3_REGEX, "qwen2": QWEN2_REGEX}[style]
    specials = (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
        if style == "llama3"
        else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if style == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer" if style == "qwen2" else "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>" if style == "llama3" else None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|end_of_text|>" if style == "llama3" else "<|endoftext|>",
        "chat_template": CHATML,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def _llama2_style_spm(corpus: list[str], vocab_size: int) -> bytes:
    """A serialized SentencePiece BPE model with Llama 2's settings (byte fallback, digits split)."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
    )
    return buf.getvalue()


def train_sentencepiece_tokenizer(out: Path, vocab_size: int = 400) -> Path:
    """A Llama-2-style SentencePiece BPE model with byte fallback (tokenizer.model)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(_llama2_style_spm(CORPUS, vocab_size))
    config = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "chat_template": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
        "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    # Real Llama 2 / Mistral folders ship tokenizer.json beside tokenizer.model, with
    # SentencePiece's own normalization (prepend "▁", spaces to "▁"). transformers 5 writes a
    # Metaspace pre-tokenizer instead, which skips the prefix before a leading space; restore
    # the hub layout so the fixture behaves like the models users bring.
    from transformers import LlamaTokenizer

    LlamaTokenizer.from_pretrained(out).save_pretrained(out)
    tok = json.loads((out / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    tok["pre_tokenizer"] = None
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    return out


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA_TURN_MARKERS = ["<start_of_turn>", "<end_of_turn>"]


def train_gemma_tokenizer(out: Path, tokenizer_json: bool = True, vocab_size: int = 400) -> Path:
    """A Gemma-style SentencePiece BPE: no dummy prefix, the turn markers user-defined pieces of the model.

    With `tokenizer_json`, a tokenizer.json lists the markers as special added tokens,
    as Gemma's instruction-tuned releases do; without it HF and the converter read
    tokenizer.model only, so the markers' type comes from the SentencePiece model.
    """
    import io

    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        control_symbols=["<mask>"],  # else transformers appends a <mask> past the model's vocabulary
        user_defined_symbols=GEMMA_TURN_MARKERS, add_dummy_prefix=False, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    config = {
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "chat_template": GEMMA_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_json:
        from transformers import GemmaTokenizer

        GemmaTokenizer.from_pretrained(out).save_pretrained(out)
        tok = json.loads((out / "tokenizer.json").read_text())
        for item in tok["added_tokens"]:
            item["special"] = item["special"] or item["content"] in GEMMA_TURN_MARKERS
        (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    return out


def without_tokenizer_model(src: Path, out: Path) -> Path:
    """A copy of a SentencePiece tokenizer folder keeping only tokenizer.json (as a GGUF source has)."""
    import shutil

    shutil.copytree(src, out, ignore=shutil.ignore_patterns("tokenizer.model"))
    return out


def vocab_size_of(tokenizer_dir: Path) -> int:
    if (tokenizer_dir / "tokenizer.model").is_file():
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model")).vocab_size()
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def tiny_config(family: str, vocab_size: int, **overrides):
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        initializer_range=0.1, tie_word_embeddings=False,
    )
    common.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "gemma": transformers.GemmaConfig}[family]
    return cls(**common)


def build_tiny_model(
    out: Path, family: str, tokenizer_dir: Path, seed: int = 0, bias_std: float = 0.0, **overrides
) -> Path:
    """Random weights from a config, saved as an HF folder with the given tokenizer.

    transformers initialises biases to zero, where a wrong bias layout would go
    unseen: `bias_std` draws them at random instead.
    """
    import shutil

    import torch
    import transformers

    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size_of(tokenizer_dir), **overrides)
    config.architectures = [type(transformers.AutoModelForCausalLM.from_config(config)).__name__]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if bias_std:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, bias_std)
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


LLAMA2_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + m['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# Llama 2 chat turns and Markdown lists: pieces such as "▁[", "▁*" and "▁▁" on which the
# tokenizer transformers builds from tokenizer.model alone and SentencePiece part ways.
LLAMA2_CORPUS = CORPUS + [
    "[INST] What is the capital of France? [/INST] Paris.</s>",
    "[INST] And of Germany? [/INST] Berlin.",
    "x  * a list  * item   ** bold **",
    "  * first\n  * second\n    * nested",
] * 20


def train_llama2_spm_only_tokenizer(out: Path, vocab_size: int = 500) -> Path:
    """An older Llama 2 / Vicuna style folder: tokenizer.model and tokenizer_config.json only,
    no tokenizer.json, with the Llama 2 chat template ("<s>[INST] ... [/INST] ... </s>")."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(_llama2_style_spm(LLAMA2_CORPUS, vocab_size))
    config = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True, "chat_template": LLAMA2_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out
