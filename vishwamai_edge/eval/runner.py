"""Run `eval`: every bundle over the same windows of the same text, the first bundle the reference.

The bundles are loaded together and each window goes through all of them in turn, so no logits are kept
beyond one window's (memory: the models, plus n_ctx x vocabulary floats per bundle). Each bundle runs in its
own runtime with the options given (context, threads, KV-cache type), as `chat` would run it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import __version__
from ..errors import InputError, UserError
from ..fsutil import write_json
from ..runtime.backends import SupportsScoring
from ..runtime.options import RuntimeOptions
from ..runtime.pipeline import Pipeline
from .scoring import Scores, log_softmax, windows

DEFAULT_TEXT = "eval-text.txt"  # vishwamai_edge/data: written for this project (its licence), plain English prose
SCHEMA = "vishwamai-edge-eval"
SCHEMA_VERSION = 1


@dataclass
class EvalResult:
    report: dict[str, Any]
    out_dir: Path


def read_text(path: Path | None) -> tuple[str, str]:
    """The text and where it came from (the shipped default when `path` is None)."""
    if path is None:
        return (resources.files("vishwamai_edge") / "data" / DEFAULT_TEXT).read_text(encoding="utf-8"), DEFAULT_TEXT
    try:
        return Path(path).read_text(encoding="utf-8"), str(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise InputError(f"{path} is not a UTF-8 text file") from None


def run_eval(bundles: list[Path], out: Path, text: Path | None = None, n_ctx: int = 512,
             options: RuntimeOptions | None = None, console: Console | None = None) -> EvalResult:
    console = console or Console(stderr=True)
    if not bundles:
        raise UserError("name at least one bundle (or GGUF file) to evaluate")
    body, source = read_text(text)
    options = options or RuntimeOptions()
    loaded: list[Pipeline] = []
    try:
        with console.status("loading the bundles"):
            for path in bundles:
                loaded.append(Pipeline.load(path, RuntimeOptions(n_ctx=n_ctx, n_threads=options.n_threads,
                                                                 kv_type=options.kv_type, parallel=1)))
        tokens, bos = _tokens(loaded, bundles, body)
        wins = windows(tokens, n_ctx, bos)
        first = n_ctx // 2
        scores = [Scores() for _ in loaded]
        seconds = [0.0 for _ in loaded]
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(f"{len(wins)} windows of {n_ctx} tokens x {len(loaded)} bundles", total=len(wins))
            for window in wins:
                targets = window[first + 1:]
                reference = None
                for i, pipeline in enumerate(loaded):
                    t = time.perf_counter()
                    logits = pipeline.llm.score(window)[first:-1]
                    seconds[i] += time.perf_counter() - t
                    scores[i].add(logits, targets, reference)
                    if i == 0:
                        reference = log_softmax(logits)
                bar.advance(task)
        report = _report(bundles, loaded, scores, seconds, source, body, tokens, n_ctx, len(wins), options.kv_type)
    finally:
        for pipeline in loaded:
            pipeline.close()
    from .outputs import write_outputs

    out_dir = Path(out)
    write_outputs(out_dir, report, [s.kld_values() for s in scores])
    for path, entry in zip(bundles, report["bundles"]):
        write_json(_beside(Path(path)), {**{k: v for k, v in report.items() if k != "bundles"}, "result": entry})
    return EvalResult(report, out_dir)


def _tokens(loaded: list[Pipeline], paths: list[Path], body: str) -> tuple[list[int], int | None]:
    """The text's tokens (BOS first, as llama-perplexity tokenizes it); every bundle must give the same."""
    llm = loaded[0].llm
    if not isinstance(llm, SupportsScoring):
        raise UserError(f"{paths[0]}: eval runs llama.cpp bundles; this one's backend cannot score a window")
    tokens = llm.tokenize(body, add_special=True, parse_special=False)
    for path, pipeline in zip(paths[1:], loaded[1:]):
        if not isinstance(pipeline.llm, SupportsScoring):
            raise UserError(f"{path}: eval runs llama.cpp bundles; this one's backend cannot score a window")
        if pipeline.llm.n_vocab != llm.n_vocab or pipeline.llm.tokenize(body, True, False) != tokens:
            raise InputError(f"{path} has another vocabulary than {paths[0]}: KL divergence compares the same "
                             "tokens; evaluate bundles of one model")
    bos = llm.special_token("bos")
    return tokens, bos[0] if bos else None


def _report(paths: list[Path], loaded: list[Pipeline], scores: list[Scores], seconds: list[float], source: str,
            body: str, tokens: list[int], n_ctx: int, n_windows: int, kv_type: str | None) -> dict[str, Any]:
    entries = []
    for i, (path, pipeline, score) in enumerate(zip(paths, loaded, scores)):
        bundle = pipeline.bundle
        entries.append({
            "name": bundle.name, "path": str(path), "quant": bundle.llm.quant, "reference": i == 0,
            "kv_type": kv_type or bundle.runtime_defaults.kv_type,
            "seconds": round(seconds[i], 2), **score.summary(),
        })
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "text": {"source": source, "sha256": hashlib.sha256(body.encode()).hexdigest(), "tokens": len(tokens)},
        "n_ctx": n_ctx, "windows": n_windows, "scored_per_window": n_ctx - 1 - n_ctx // 2,
        "method": "llama-perplexity's: whole windows, BOS first, the second half of each scored",
        "bundles": entries,
    }


def _beside(path: Path) -> Path:
    """The eval record beside a bundle folder or GGUF file (the bundle itself is never changed)."""
    return path.with_name(path.name + ".eval.json")
