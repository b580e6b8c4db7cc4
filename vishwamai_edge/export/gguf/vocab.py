"""Tokenizer -> GGUF vocabulary: byte-level BPE (tokenizer.json) and SentencePiece (tokenizer.model).

Special token ids, add_bos/add_eos, merges and the chat template are read by
gguf-py's `SpecialVocab`; this module adds the token list and picks llama.cpp's
pre-tokenizer, which must match the HF one or the two tokenize text differently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
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
            _add_hf_sentencepiece(writer, hf_dir, tok, vocab_size)  # SentencePiece as tokenizer.json
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


@dataclass
class _SpmVocab:
    """A llama.cpp `llama` vocabulary being assembled: one entry per token id."""

    tokens: list[bytes] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)

    def append(self, text: bytes, score: float, ttype: int) -> None:
        self.tokens.append(text)
        self.scores.append(score)
        self.types.append(ttype)

    def pad_to(self, size: int) -> None:
        """Fill ids up to `size` (embedding rows past the tokenizer) with unused placeholders."""
        while len(self.tokens) < size:
            self.append(f"[PAD{len(self.tokens)}]".encode(), -1000.0, gguf.TokenType.UNUSED)


def _add_sentencepiece(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int) -> None:
    proto = _sp_proto(hf_dir)
    vocab = _SpmVocab()
    for piece in proto.pieces:
        # the proto's piece types and llama.cpp's token types share their numbering
        vocab.append(piece.piece.encode("utf-8"), piece.score, gguf.TokenType(piece.type))
    _apply_added_tokens(vocab, _added_tokens(hf_dir))
    vocab.pad_to(vocab_size)
    _write_spm(writer, vocab, bool(proto.normalizer_spec.add_dummy_prefix))


def _add_hf_sentencepiece(
    writer: gguf.GGUFWriter, hf_dir: Path, tok: dict[str, Any], vocab_size: int
) -> None:
    """A SentencePiece BPE stored only as tokenizer.json (byte fallback), e.g. a GGUF source's folder.

    llama.cpp merges the adjacent pair whose result scores highest; HF applies the
    merge of lowest rank. Scoring each token by minus the rank of the first merge
    that makes it gives llama.cpp the same order.
    """
    model = tok["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    ranks = _merge_ranks(model.get("merges", []))
    unk = model.get("unk_token")
    vocab = _SpmVocab()
    for i in range(max(by_id, default=-1) + 1):
        text = by_id.get(i)
        if text is None:
            vocab.pad_to(i + 1)
        elif text == unk:
            vocab.append(text.encode("utf-8"), 0.0, gguf.TokenType.UNKNOWN)
        elif _BYTE_PIECE.fullmatch(text):
            vocab.append(text.encode("utf-8"), 0.0, gguf.TokenType.BYTE)
        else:
            vocab.append(text.encode("utf-8"), -float(ranks.get(text, 0)), gguf.TokenType.NORMAL)
    _apply_added_tokens(vocab, tok.get("added_tokens", []))
    vocab.pad_to(vocab_size)
    _write_spm(writer, vocab, _hf_adds_space_prefix(tok))


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _merge_ranks(merges: list[Any]) -> dict[str, int]:
    """Token -> rank of the first merge producing it (merges are "a b" strings or [a, b] pairs)."""
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, rank + 1)  # 1-based: rank 0 is for tokens no merge makes
    return ranks


def _hf_adds_space_prefix(tok: dict[str, Any]) -> bool:
    """Whether tokenizer.json prepends "▁" to the text, as SentencePiece's add_dummy_prefix does."""
    for step in _steps(tok.get("normalizer")):
        if step.get("type") == "Prepend" and step.get("prepend") == "▁":
            return True
    for step in _steps(tok.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            # "first" only prefixes the start of the text, llama.cpp also after each special
            # token: the tokenizer check reports any prompt where that matters.
            scheme = step.get("prepend_scheme", "always")
            return scheme != "never" and bool(step.get("add_prefix_space", True))
    return False


def _steps(component: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not component:
        return []
    for key in ("normalizers", "pretokenizers"):
        if component.get("type") == "Sequence" and key in component:
            return component[key]
    return [component]


def _apply_added_tokens(vocab: _SpmVocab, added: list[dict[str, Any]]) -> None:
    """Added tokens (chat markers, often re-used unused pieces) take their id's text and type.

    llama.cpp splits CONTROL and USER_DEFINED tokens out of the text before
    SentencePiece runs, as HF splits its added tokens; a piece left NORMAL would be
    spelled out character by character instead.
    """
    for item in sorted(added, key=lambda t: t["id"]):
        i = item["id"]
        ttype = gguf.TokenType.CONTROL if item.get("special") else gguf.TokenType.USER_DEFINED
        text = item["content"].encode("utf-8")
        if i >= len(vocab.tokens):
            vocab.pad_to(i)
            vocab.append(text, -1000.0, ttype)
        elif vocab.types[i] not in (gguf.TokenType.UNKNOWN, gguf.TokenType.BYTE):  # keep their meaning
            vocab.tokens[i] = text
            vocab.types[i] = ttype


def _write_spm(writer: gguf.GGUFWriter, vocab: _SpmVocab, add_space_prefix: bool) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_add_space_prefix(add_space_prefix)


def _sp_proto(hf_dir: Path) -> Any:
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

    sp = SentencePieceProcessor()
    if not sp.Load(str(hf_dir / "tokenizer.model")):
        raise ExportError(f"{hf_dir}/tokenizer.model is not a SentencePiece model")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return proto


def _added_tokens(hf_dir: Path) -> list[dict[str, Any]]:
    if (hf_dir / "tokenizer.json").is_file():
        return json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", [])
    if (hf_dir / "added_tokens.json").is_file():
        added = json.loads((hf_dir / "added_tokens.json").read_text(encoding="utf-8"))
        return [{"id": i, "content": t, "special": True} for t, i in sorted(added.items(), key=lambda x: x[1])]
    return []
