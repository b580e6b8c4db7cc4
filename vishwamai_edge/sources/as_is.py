"""A pre-quantized GGUF bundled as it is: what can be checked without torch, and the manifest's record of the
source (a Hub commit, the as-is check)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SourceError, first_line, require
from ..fsutil import check_gguf_file
from .gguf import gguf_sha256

AS_IS_CHECK = "as-is.check.json"  # in build/<recipe>/: the check of the GGUF last bundled as is


AS_IS_QUESTION = "What is the capital of France?"


AS_IS_NOTE = ("bundled as is (no conversion, no requantization); no torch comparison was made: "
              "GGUF header, tensor types, llama.cpp tokenizer round trip and one greedy answer only")


def check_as_is(gguf_path: Path, texts: list[str], root: Path, n_threads: int | None = None) -> tuple[str, dict]:
    """What can be checked of a GGUF without a torch reference; (its quant name, its manifest entry).

    Recorded in build/<recipe>/as-is.check.json by the file's sha256 and redone only when it changes.
    """
    from ..fsutil import sha256_json, write_json

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
        raise SourceError(f"cannot read {path.name} as a GGUF: {first_line(exc)}") from None

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
    from ..runtime.options import RuntimeOptions
    from ..runtime.pipeline import Pipeline

    try:
        pipeline = Pipeline.load(path, RuntimeOptions(n_ctx=512, n_threads=n_threads))
    except Exception as exc:  # noqa: BLE001 - a GGUF llama.cpp cannot load is the user's file
        raise SourceError(f"llama.cpp cannot load {path.name}: {first_line(exc)}") from None
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
    from ..fsutil import write_json
    from ..runtime.manifest import Manifest

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
