"""A GGUF source -> an HF folder: dequantized once per GGUF content (its sha256) and cached, the tokenizer
restored as the GGUF describes it."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SourceError, first_line, quiet_transformers, require
from ..fsutil import atomic_dir, check_gguf_file, sha256_file

SOURCE_RECORD = "source.json"  # in a materialised folder: the GGUF it came from and its sha256


_DIGESTS: dict[tuple, str] = {}  # file key (path, size, mtime, inode) -> sha256, in this process


def hf_dir_from_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF into a plain HF folder (fp16 safetensors + tokenizer), once per GGUF content.

    The folder records the sha256 of the file it was made from and is remade when
    the GGUF differs; its files are then new, so every later stage's stamp (which
    fingerprints the folder) no longer matches either.
    """
    gguf_path = check_gguf_file(gguf_path)
    previous = _source_record(out_dir)
    digest = gguf_sha256(gguf_path, previous)
    if previous is not None and previous.get("sha256") == digest:
        return out_dir
    model, tokenizer = dequantize_gguf(gguf_path)
    n_tokens = _restore_tokenizer(tokenizer, gguf_path)

    record = {"gguf": str(gguf_path), "sha256": digest, "file": _file_key(gguf_path)}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _drop_tokens_past(tmp / "tokenizer.json", n_tokens)
        (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=2))
        (tmp / ".complete").write_text("")
    return out_dir


def dequantize_gguf(gguf_path: Path):
    """The GGUF's model (fp16, every weight from the file) and tokenizer, as transformers reads them."""
    torch = require("torch", "build")
    transformers = quiet_transformers()
    require("accelerate", "build")  # transformers needs it to load GGUF weights

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, output_loading_info=True
        )
    except Exception as exc:  # transformers raises many kinds for a bad file
        raise SourceError(f"cannot read {gguf_path} as a model: {first_line(exc)}") from None

    # A model loaded from a GGUF refuses save_pretrained: rebuild it from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    state = {k: v.to(torch.float16) for k, v in loaded.state_dict().items()}
    _load_all_weights(model, state, set(info["missing_keys"]), gguf_path)
    model.tie_weights()
    return model, tokenizer


def _source_record(out_dir: Path) -> dict | None:
    """What a complete materialised folder was made from, or None (absent, unfinished, unreadable)."""
    if not (out_dir / ".complete").is_file():
        return None
    try:
        return json.loads((out_dir / SOURCE_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _file_key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def gguf_sha256(path: Path, record: dict | None = None) -> str:
    """The file's sha256, read once per (path, size, mtime, inode).

    A multi-GB GGUF is not re-read on every build while it is unchanged: the
    folder's record (or this process) already holds its hash.
    """
    key = _file_key(path)
    if record is not None and record.get("file") == key and record.get("sha256"):
        return record["sha256"]
    memo = tuple(sorted(key.items()))
    if memo not in _DIGESTS:
        _DIGESTS[memo] = sha256_file(path)
    return _DIGESTS[memo]


def _load_all_weights(model, state: dict, missing_in_file: set[str], gguf_path: Path) -> None:
    """Load `state` into `model`, refusing a GGUF that lacks any weight but those tying supplies.

    transformers fills a tensor the file lacks with random values and only logs it:
    a model built from such a folder would convert and run, and answer nonsense.
    """
    result = model.load_state_dict(state, strict=False)
    missing = (set(result.missing_keys) | missing_in_file) - _tied_keys(model)
    if missing:
        raise SourceError(f"{gguf_path} lacks weights the model needs: {', '.join(sorted(missing))}")
    if result.unexpected_keys:
        unused = ", ".join(sorted(result.unexpected_keys))
        raise SourceError(f"{gguf_path} has weights the model does not use: {unused}")


def _tied_keys(model) -> set[str]:
    """State-dict keys of the output embedding when it is tied to the input embedding (a GGUF omits it)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    output = model.get_output_embeddings()
    if output is None:
        return set()
    return {f"{name}.weight" for name, module in model.named_modules() if module is output}


def _restore_tokenizer(tokenizer, gguf_path: Path) -> int:
    """Give the tokenizer transformers rebuilds from a GGUF back the text handling llama.cpp applies.

    Returns the number of tokens in the GGUF's vocabulary.
    """
    gguf = require("gguf", "build")

    reader = gguf.GGUFReader(gguf_path)

    def field(name: str):
        value = reader.fields.get(name)
        return value.contents() if value is not None else None

    if field("tokenizer.ggml.model") == "llama":
        _restore_sentencepiece_normalizer(tokenizer, field("tokenizer.ggml.add_space_prefix") is not False)
    else:
        _restore_pre_tokenizer(tokenizer, field("tokenizer.ggml.pre"))
    return len(reader.fields["tokenizer.ggml.tokens"].data)


def _drop_tokens_past(tokenizer_json: Path, n_tokens: int) -> None:
    """Remove added tokens transformers invents past the GGUF's vocabulary.

    (It appends an `<|endoftext|>` to a Llama 3 style one.) The model has no
    embedding row for them, and llama.cpp refuses a vocabulary longer than that.
    """
    if not tokenizer_json.is_file():
        return
    tok = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    kept = [t for t in tok.get("added_tokens", []) if t["id"] < n_tokens]
    if len(kept) != len(tok.get("added_tokens", [])):
        tok["added_tokens"] = kept
        tokenizer_json.write_text(json.dumps(tok, ensure_ascii=False, indent=2), encoding="utf-8")


def _restore_sentencepiece_normalizer(tokenizer, add_space_prefix: bool) -> None:
    """transformers rebuilds a SentencePiece GGUF's tokenizer with a Metaspace "first" pre-tokenizer.

    That adds no "▁" before a leading space or after a special token, where
    SentencePiece (and llama.cpp) do: restore SentencePiece's own normalization.
    """
    from tokenizers import normalizers

    spaces = normalizers.Replace(" ", "\u2581")
    steps = [normalizers.Prepend("\u2581"), spaces] if add_space_prefix else [spaces]
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.backend_tokenizer.pre_tokenizer = None


def _restore_pre_tokenizer(tokenizer, pre: str | None) -> None:
    """transformers rebuilds a GGUF's BPE tokenizer with plain byte-level pre-tokenization.

    Models whose llama.cpp pre-tokenizer splits digits one by one (SmolLM, StarCoder)
    lose that split, so HF and llama.cpp would disagree on any text with numbers.
    """
    from tokenizers import pre_tokenizers

    if pre in ("smollm", "starcoder", "refact"):
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )

