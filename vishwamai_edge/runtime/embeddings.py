"""Sentence embeddings on the device: the bundle's embedding graph (export/onnx/sentence_embeddings.py) run by
ONNX Runtime, its tokenizer by `tokenizers`; no torch. The graph pools and normalises itself, so a vector here
is the one sentence-transformers gives for the same text."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError, InputError, require
from .onnx_session import Provider, ort_session

BATCH = 32  # texts per graph run


class _Sized:
    """What an embedding model's contract says about its vectors and window."""

    contract: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.contract["dim"])

    @property
    def max_tokens(self) -> int:
        return int(self.contract["max_tokens"])


@dataclass
class Embedder(_Sized):
    session: Any
    tokenizer: Any
    contract: dict[str, Any]
    folder: Path

    @classmethod
    def load(cls, folder: Path, providers: list[Provider] | None = None, threads: int | None = None) -> Embedder:
        folder = Path(folder)
        try:
            contract = json.loads((folder / "embedding.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            raise BundleError(f"{folder} holds no readable embedding.json: not an exported embedding model") from None
        tokenizer = _tokenizer(folder / contract["files"]["tokenizer"], str(folder))
        session = ort_session(folder / contract["files"]["model"], providers, threads, "embedding model")
        return cls(session, tokenizer, contract, folder)

    @classmethod
    def from_manifest(cls, bundle: Any, entry: dict[str, Any], threads: int | None = None) -> Embedder:
        """The bundle's `encoders.embedding`: only the files the manifest lists are opened."""
        files = entry.get("files") or {}
        tokenizer = _tokenizer(bundle.file(files.get("tokenizer", "")), f"bundle {bundle.root}")
        providers = entry.get("providers") or None
        session = ort_session(bundle.file(files.get("model", "")), providers, threads, "embedding model")
        return cls(session, tokenizer, entry, bundle.root)

    def token_ids(self, text: str) -> list[int]:
        """The ids the model reads for `text`, its special tokens included."""
        return list(self.tokenizer.encode(text).ids)

    def ids_for(self, texts: list[str], what: str = "text", max_total: int | None = None) -> list[list[int]]:
        """Each text's token ids; a text longer than the model's window (chunk documents first), or texts over
        `max_total` tokens together, are refused."""
        ids = [self.token_ids(t) for t in texts]
        for t, row in zip(texts, ids):
            if len(row) > self.max_tokens:
                raise InputError(f"the {what} is {len(row)} tokens long; the embedding model reads at most "
                                 f"{self.max_tokens} ({t[:40]!r}...)")
        total = sum(map(len, ids))
        if max_total is not None and total > max_total:
            raise InputError(f"the {what} holds {total} tokens together; one request takes at most {max_total}")
        return ids

    def embed(self, texts: list[str], what: str = "text") -> np.ndarray:
        """float32 [len(texts), dim]; a text longer than the model's window is refused (chunk documents first)."""
        return self.embed_ids(self.ids_for(texts, what))

    def embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        """float32 [len(ids), dim] for texts already tokenized (`ids_for`)."""
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
        for start in range(0, len(order), BATCH):
            chunk = order[start:start + BATCH]
            width = max(len(ids[i]) for i in chunk)
            input_ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for r, i in enumerate(chunk):
                input_ids[r, :len(ids[i])] = ids[i]
                mask[r, :len(ids[i])] = 1
            (vectors,) = self.session.run(None, {"input_ids": input_ids, "attention_mask": mask})
            out[chunk] = vectors
        return out

    def close(self) -> None:
        self.session = None


def _tokenizer(path: Path, where: str) -> Any:
    """The model's tokenizer, whole: the window is enforced here, not cut silently, and batches pad themselves."""
    tokenizers = require("tokenizers", "runtime")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001  tokenizers raises its own exception for a bad file
        raise BundleError(f"{where}: the embedding tokenizer cannot be read ({exc})") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


class LazyEmbedder(_Sized):
    """The bundle's embedding model, loaded (its files checked, its session made) the first time it is used: the
    default bundle carries one, and a chat that never embeds should not hold it in memory."""

    def __init__(self, bundle: Any, entry: dict[str, Any], threads: int | None) -> None:
        import threading

        self.bundle, self.contract, self.threads = bundle, entry, threads
        self._loaded: Embedder | None = None
        self._lock = threading.Lock()

    def _get(self) -> Embedder:
        with self._lock:
            if self._loaded is None:
                self._loaded = Embedder.from_manifest(self.bundle, self.contract, self.threads)
            return self._loaded

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    @property
    def tokenizer(self) -> Any:
        return self._get().tokenizer

    def token_ids(self, text: str) -> list[int]:
        return self._get().token_ids(text)

    def ids_for(self, texts: list[str], what: str = "text", max_total: int | None = None) -> list[list[int]]:
        return self._get().ids_for(texts, what, max_total)

    def embed(self, texts: list[str], what: str = "text") -> np.ndarray:
        return self._get().embed(texts, what)

    def embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        return self._get().embed_ids(ids)

    def close(self) -> None:
        if self._loaded is not None:
            self._loaded.close()
