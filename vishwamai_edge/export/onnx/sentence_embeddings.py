"""A sentence-embedding model (BERT family: all-MiniLM, bge, e5) -> one ONNX graph that returns the sentence
vectors, pooled and normalised as the folder's sentence-transformers config says, checked against
sentence-transformers itself.

    inputs   input_ids, attention_mask   int64 [batch, tokens]   (token_type_ids are all 0 for one sentence)
    output   embeddings                  float32 [batch, dim]

The folder: `modules.json` (Transformer, Pooling, optional Normalize), `1_Pooling/config.json` (the pooling
mode), `sentence_bert_config.json` (`max_seq_length`, `do_lower_case`), `tokenizer.json`. The bundle's folder
gets `model.onnx`, `tokenizer.json` and `embedding.json` (the contract `runtime.embeddings` reads).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ExportError, SourceError, quiet_transformers, require
from ...fsutil import atomic_dir, write_json
from .base import write_dtype

GRAPH = "model.onnx"
CONTRACT = "embedding.json"
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "embeddings"
POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "lasttoken"}
# Sentences the check embeds: short and long, several scripts, digits, a repeated word.
CHECK_SENTENCES = [
    "How do I reset the hydraulic pump after a pressure fault?",
    "The capital of France is Paris.",
    "Torque the M8 bolts to 25 N·m in a star pattern, then check again after ten minutes.",
    "Les élèves étudient la photosynthèse — 光合作用 — à l'école.",
    "error error error: the sensor reads 0x3F at 40 °C",
    "A",
]
# The graph against sentence-transformers: cosine per sentence (1 = the same direction), and max |difference|.
LIMITS = {"fp32": {"min_cosine": 0.9999, "max_abs_diff": 1e-4}, "fp16": {"min_cosine": 0.999, "max_abs_diff": 5e-3},
          "int8": {"min_cosine": 0.98, "max_abs_diff": 0.1}}


@dataclass
class EmbeddingContract:
    pooling: str  # cls | mean | max | lasttoken
    normalize: bool
    max_tokens: int  # the model's window: longer text is refused (queries) or chunked (documents)
    dim: int
    dtype: str
    model_type: str
    check: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_sentence_config(folder: Path) -> tuple[str, bool, int]:
    """(pooling mode, normalised, max tokens) from a sentence-transformers folder; one-line errors."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        raise SourceError(f"{folder} is not a sentence-transformers folder (no modules.json); an embedding model "
                          "needs its pooling named there")
    try:
        modules = json.loads(modules_path.read_text())
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        pool_dir = next(folder / m.get("path", "") for m in modules if m["type"].endswith("Pooling"))
        pooling = json.loads((pool_dir / "config.json").read_text())
    except (json.JSONDecodeError, KeyError, TypeError, StopIteration, FileNotFoundError):
        raise SourceError(f"{modules_path}: no readable Pooling module (its folder's config.json)") from None
    unsupported = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if unsupported:
        raise SourceError(f"{modules_path}: modules {', '.join(unsupported)} are not supported (Transformer, Pooling "
                          "and Normalize are)")
    modes = [mode for key, mode in POOLING_MODES.items() if pooling.get(key)]
    if len(modes) != 1:
        raise SourceError(f"{pool_dir / 'config.json'}: one pooling mode is supported at a time "
                          f"({', '.join(POOLING_MODES.values())}), this one asks for {modes or 'none'}")
    st_config = folder / "sentence_bert_config.json"
    settings = json.loads(st_config.read_text()) if st_config.is_file() else {}
    config = json.loads((folder / "config.json").read_text())
    max_tokens = int(settings.get("max_seq_length") or config.get("max_position_embeddings", 512))
    return modes[0], "Normalize" in kinds, max_tokens


def pooled(hidden, mask, mode: str, normalize: bool):
    """Sentence vectors from token states, as sentence-transformers' Pooling and Normalize modules compute them."""
    torch = require("torch", "build")
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        out = hidden[:, 0]
    elif mode == "mean":
        out = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    elif mode == "max":
        out = hidden.masked_fill(m == 0, -1e9).max(1).values
    else:  # lasttoken: the last real token of each row (right padding)
        last = mask.sum(1) - 1
        out = hidden[torch.arange(hidden.shape[0]), last]
    return torch.nn.functional.normalize(out, p=2, dim=1) if normalize else out


def export_sentence_embedder(folder: Path, out: Path, dtype: str = "fp32", threads: int | None = None
                             ) -> EmbeddingContract:
    """`folder` -> `out` (model.onnx, tokenizer.json, embedding.json), atomically; the graph checked against
    sentence-transformers on CHECK_SENTENCES before anything is written."""
    torch = require("torch", "build")
    transformers = quiet_transformers()
    if not (folder / "tokenizer.json").is_file():
        raise SourceError(f"{folder} has no tokenizer.json (the device tokenizes with the `tokenizers` library)")
    mode, normalize, max_tokens = read_sentence_config(folder)
    config = json.loads((folder / "config.json").read_text())
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    model.config.max_position_embeddings = config.get("max_position_embeddings", max_tokens)

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            kwargs: dict[str, Any] = {}
            if "token_type_ids" in self.model.forward.__code__.co_varnames:
                kwargs["token_type_ids"] = torch.zeros_like(input_ids)
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            return pooled(hidden, attention_mask, mode, normalize)

    def fp32_export(path: Path) -> None:
        example = (torch.tensor([[1, 2, 3, 2], [1, 3, 2, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
        with torch.no_grad():
            torch.onnx.export(Embed().eval(), example, str(path), dynamo=False, opset_version=17,
                              input_names=list(INPUTS), output_names=[OUTPUT],
                              dynamic_axes={n: {0: "batch", 1: "tokens"} for n in INPUTS} | {OUTPUT: {0: "batch"}},
                              do_constant_folding=True)

    with atomic_dir(out) as tmp:
        write_dtype(fp32_export, tmp / GRAPH, dtype, ["MatMul"])
        shutil.copy2(folder / "tokenizer.json", tmp / "tokenizer.json")
        contract = EmbeddingContract(pooling=mode, normalize=normalize, max_tokens=max_tokens,
                                     dim=int(config["hidden_size"]), dtype=dtype, model_type=config.get("model_type", ""),
                                     files={"model": GRAPH, "tokenizer": "tokenizer.json"})
        write_json(tmp / CONTRACT, contract.to_dict())
        contract.check = check_against_sentence_transformers(folder, tmp, dtype, threads)
        write_json(tmp / CONTRACT, contract.to_dict())
    return contract


def check_against_sentence_transformers(folder: Path, exported: Path, dtype: str, threads: int | None
                                        ) -> dict[str, Any]:
    """The exported folder, run as the device runs it, against sentence-transformers' own encode()."""
    import numpy as np

    st = require("sentence_transformers", "build")
    from ...runtime.embeddings import Embedder

    embedder = Embedder.load(exported, threads=threads)
    # the sentences within the model's window (sentence-transformers would cut the others, the device refuses them)
    sentences = [t for t in CHECK_SENTENCES if len(embedder.token_ids(t)) <= embedder.max_tokens]
    got = embedder.embed(sentences).astype(np.float64)
    embedder.close()
    reference = st.SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    want = np.asarray(reference.encode(sentences, convert_to_numpy=True), dtype=np.float64)
    cos = (want * got).sum(1) / (np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1))
    check = {"sentences": len(sentences), "min_cosine": round(float(cos.min()), 7),
             "max_abs_diff": float(np.abs(want - got).max()), "reference": f"sentence-transformers {st.__version__}",
             "tolerance": LIMITS[dtype]}
    if check["min_cosine"] < LIMITS[dtype]["min_cosine"] or check["max_abs_diff"] > LIMITS[dtype]["max_abs_diff"]:
        raise ExportError(f"the {dtype} embedding graph differs from sentence-transformers beyond tolerance: min cosine "
                          f"{check['min_cosine']:.6f} (allowed {LIMITS[dtype]['min_cosine']}), max |difference| "
                          f"{check['max_abs_diff']:.3g} (allowed {LIMITS[dtype]['max_abs_diff']})")
    return check
