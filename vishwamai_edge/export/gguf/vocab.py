"""Tokenizer -> GGUF vocabulary: byte-level BPE (tokenizer.json) and SentencePiece (tokenizer.model).

Special token ids, add_bos/add_eos, merges and the chat template are read by
gguf-py's `SpecialVocab`; this module adds the token list and picks llama.cpp's
pre-tokenizer, which must match the HF one or the two tokenize text differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from ...errors import ExportError

# llama.cpp pre-tokenizer names, keyed by the split regex of the HF tokenizer.json.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS_BY_REGEX = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


def add_vocab(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int, pre: str | None = None) -> str:
    """Write the tokenizer of `hf_dir` into `writer`; returns the tokenizer kind written."""
    if (hf_dir / "tokenizer.model").is_file():
        _add_sentencepiece(writer, hf_dir, vocab_size)
        kind = "llama"
    elif (hf_dir / "tokenizer.json").is_file():
        tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
        model = tok.get("model", {})
        if model.get("type") != "BPE":
            raise ExportError(f"{hf_dir}/tokenizer.json: model type {model.get('type')} is not supported")
        if model.get("byte_fallback"):
            _add_hf_sentencepiece(writer, hf_dir)  # SentencePiece converted to tokenizer.json
            kind = "llama"
        else:
            _add_bpe(writer, tok, vocab_size, pre or detect_bpe_pre(tok, hf_dir))
            kind = "gpt2"
    else:
        raise ExportError(f"{hf_dir} has neither tokenizer.json nor tokenizer.model")

    special = gguf.SpecialVocab(hf_dir, load_merges=(kind == "gpt2"), n_vocab=vocab_size)
    for typ, value in _added_specials(hf_dir, special.special_token_ids).items():
        special.add_special_token.setdefault(typ, value)
    special.add_to_gguf(writer, quiet=True)
    return kind


def _added_specials(hf_dir: Path, ids: dict[str, int]) -> dict[str, bool]:
    """Whether the HF tokenizer adds BOS/EOS by itself, observed by encoding a word.

    transformers 5 often leaves add_bos_token out of tokenizer_config.json, and
    llama.cpp's default differs by vocabulary type, so write what HF really does.
    """
    if not (hf_dir / "tokenizer.json").is_file():
        return {}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    plain = tok.encode("hello", add_special_tokens=False).ids
    full = tok.encode("hello", add_special_tokens=True).ids
    result = {}
    if "bos" in ids:
        result["bos"] = full[:1] == [ids["bos"]] and plain[:1] != [ids["bos"]]
    if "eos" in ids:
        result["eos"] = full[-1:] == [ids["eos"]] and plain[-1:] != [ids["eos"]]
    return result


def detect_bpe_pre(tok: dict[str, Any], where: Path) -> str:
    """Name llama.cpp's pre-tokenizer that reproduces tokenizer.json's pre_tokenizer."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [s.get("type") for s in steps]
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # StarCoder-style: each digit alone, then GPT-2 split
    if types == ["Split", "ByteLevel"]:
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex in PRE_TOKENIZERS_BY_REGEX:
            return PRE_TOKENIZERS_BY_REGEX[regex]
    raise ExportError(
        f"{where}/tokenizer.json: pre-tokenizer {types} is not one llama.cpp is known to match; "
        "set export.gguf.tokenizer_pre in the recipe to the llama.cpp name"
    )


def _add_bpe(writer: gguf.GGUFWriter, tok: dict[str, Any], vocab_size: int, pre: str) -> None:
    vocab: dict[str, int] = tok["model"]["vocab"]
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    size = max(vocab_size, len(vocab), max(added, default=-1) + 1)
    by_id = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows beyond the tokenizer (padding to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)


def _add_sentencepiece(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int) -> None:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    if not sp.Load(str(hf_dir / "tokenizer.model")):
        raise ExportError(f"{hf_dir}/tokenizer.model is not a SentencePiece model")
    tokens: list[bytes] = []
    scores: list[float] = []
    types: list[int] = []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    # Tokens added on top of the SentencePiece model (e.g. chat markers).
    for item in _added_tokens(hf_dir):
        i = item["id"]
        if i < len(tokens):
            continue
        while len(tokens) < i:
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        tokens.append(item["content"].encode("utf-8"))
        scores.append(-1000.0)
        types.append(gguf.TokenType.CONTROL if item.get("special") else gguf.TokenType.USER_DEFINED)
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_sp_adds_dummy_prefix(sp))


def _add_hf_sentencepiece(writer: gguf.GGUFWriter, hf_dir: Path) -> None:
    vocab = gguf.LlamaHfVocab(hf_dir)
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def _sp_adds_dummy_prefix(sp: Any) -> bool:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return bool(proto.normalizer_spec.add_dummy_prefix)


def _added_tokens(hf_dir: Path) -> list[dict[str, Any]]:
    if (hf_dir / "tokenizer.json").is_file():
        return json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", [])
    if (hf_dir / "added_tokens.json").is_file():
        added = json.loads((hf_dir / "added_tokens.json").read_text(encoding="utf-8"))
        return [{"id": i, "content": t, "special": True} for t, i in sorted(added.items(), key=lambda x: x[1])]
    return []
