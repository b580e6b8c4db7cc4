"""Run `eval`: every row (a bundle with a KV-cache type) over the same windows of the same text, the first row
the reference; then, with a tasks file, every row's answers to its questions.

The rows are loaded together and each window goes through all of them in turn, so no logits are kept
beyond one window's (memory: the models, plus n_ctx x vocabulary floats per row). Each bundle runs in its
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
from ..fsutil import sha256_file, write_json
from ..runtime.backends import SupportsScoring
from ..runtime.options import RuntimeOptions
from ..runtime.pipeline import Pipeline
from ..runtime.speculative import SpeculativeOptions
from .scoring import Scores, log_softmax, windows
from .tasks import TaskScores, read_tasks, run_tasks

DEFAULT_TEXT = "eval-text.txt"  # vishwamai_edge/data: written for this project (its licence), plain English prose
SCHEMA = "vishwamai-edge-eval"
SCHEMA_VERSION = 1
NO_SPECULATION = SpeculativeOptions()  # windows are scored, not decoded; tasks decode plainly


@dataclass
class EvalResult:
    report: dict[str, Any]
    out_dir: Path


@dataclass(frozen=True)
class Row:
    """One row of the report: a bundle run with a KV-cache type (None: the bundle's own)."""

    path: Path
    kv_type: str | None = None


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


def eval_rows(bundles: list[Path], kv_type: str | None = None, kv_variants: list[str] | None = None) -> list[Row]:
    """Each bundle with `kv_type`, then the reference's weights again with each KV-cache type of
    `kv_variants` (what a quantized cache costs, apart from the weights' quantization)."""
    if not bundles:
        raise UserError("name at least one bundle (or GGUF file) to evaluate")
    return [*(Row(Path(b), kv_type) for b in bundles), *(Row(Path(bundles[0]), kv) for kv in kv_variants or [])]


def run_eval(rows: list[Row], out: Path, text: Path | None = None, n_ctx: int = 512,
             options: RuntimeOptions | None = None, tasks: Path | None = None,
             console: Console | None = None) -> EvalResult:
    """Perplexity (and KL divergence against the first row) over `text`, and with `tasks` the accuracy on
    its questions; the report in `out` and a record beside each bundle."""
    console = console or Console(stderr=True)
    if not rows:
        raise UserError("name at least one bundle (or GGUF file) to evaluate")
    body, source = read_text(text)
    task_list = read_tasks(tasks) if tasks is not None else None  # a wrong line before minutes of scoring
    options = options or RuntimeOptions()
    loaded: list[Pipeline] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with console.status("loading the bundles"):
            for row in rows:
                loaded.append(_load(row, n_ctx, options, with_tasks=task_list is not None))
        tokens, bos = _tokens(loaded, rows, body)
        wins = windows(tokens, n_ctx, bos)
        first = n_ctx // 2
        scores = [Scores() for _ in loaded]
        seconds = [0.0 for _ in loaded]
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(f"{len(wins)} windows of {n_ctx} tokens x {len(loaded)} rows", total=len(wins))
            for window in wins:
                targets = window[first + 1:]
                reference = None
                for i, pipeline in enumerate(loaded):
                    t = time.perf_counter()
                    logits = pipeline.llm.score(window, first)[:-1]
                    seconds[i] += time.perf_counter() - t
                    scores[i].add(logits, targets, reference)
                    if i == 0:
                        reference = log_softmax(logits)
                bar.advance(task)
        task_scores: list[TaskScores] = []
        if task_list is not None:
            with Progress(*columns, console=console, transient=True) as bar:
                for row, pipeline in zip(rows, loaded):
                    task = bar.add_task(f"{len(task_list)} tasks: {_label(row, pipeline)}", total=len(task_list))
                    task_scores.append(run_tasks(pipeline, task_list, on_task=lambda: bar.advance(task)))
        report = _report(rows, loaded, scores, seconds, source, body, tokens, n_ctx, len(wins),
                         tasks, task_scores)
    finally:
        for pipeline in loaded:
            pipeline.close()
    from .outputs import write_outputs

    out_dir = Path(out)
    write_outputs(out_dir, report, [s.kld_values() for s in scores],
                  [s.rows for s in task_scores])
    common = {k: v for k, v in report.items() if k != "bundles"}
    for path in dict.fromkeys(row.path for row in rows):
        entries = [e for row, e in zip(rows, report["bundles"]) if row.path == path]
        write_json(_beside(path), {**common, "results": entries})
    return EvalResult(report, out_dir)


def _load(row: Row, n_ctx: int, options: RuntimeOptions, with_tasks: bool) -> Pipeline:
    """The row's bundle with windows of `n_ctx`; for tasks, at least the bundle's own context (an image's
    rows and a question fit as in chat)."""
    def load(ctx: int | None) -> Pipeline:
        return Pipeline.load(row.path, RuntimeOptions(n_ctx=ctx, n_threads=options.n_threads,
                                                      kv_type=row.kv_type, parallel=1, speculative=NO_SPECULATION))
    pipeline = load(None if with_tasks else n_ctx)
    if pipeline.llm.n_ctx < n_ctx:
        pipeline.close()
        pipeline = load(n_ctx)
    return pipeline


def _label(row: Row, pipeline: Pipeline) -> str:
    kv = row.kv_type or pipeline.bundle.runtime_defaults.kv_type
    return f"{pipeline.bundle.name} ({pipeline.bundle.llm.quant}, KV {kv})"


def _tokens(loaded: list[Pipeline], rows: list[Row], body: str) -> tuple[list[int], int | None]:
    """The text's tokens (BOS first when the vocabulary adds one, as llama-perplexity tokenizes it) and that
    BOS (None without); every bundle must give the same tokens."""
    paths = [row.path for row in rows]
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
    bos = llm.special_token("bos") if llm.adds_bos() else None  # as llama-perplexity: only a vocabulary that adds it
    return tokens, bos[0] if bos else None


def _report(rows: list[Row], loaded: list[Pipeline], scores: list[Scores], seconds: list[float], source: str,
            body: str, tokens: list[int], n_ctx: int, n_windows: int, tasks: Path | None,
            task_scores: list[TaskScores]) -> dict[str, Any]:
    entries = []
    for i, (row, pipeline, score) in enumerate(zip(rows, loaded, scores)):
        bundle = pipeline.bundle
        entry = {
            "name": bundle.name, "path": str(row.path), "quant": bundle.llm.quant, "reference": i == 0,
            "kv_type": row.kv_type or bundle.runtime_defaults.kv_type,
            "seconds": round(seconds[i], 2), **score.summary(),
        }
        if task_scores:
            entry["tasks"] = task_scores[i].summary()
        entries.append(entry)
    report = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "text": {"source": source, "sha256": hashlib.sha256(body.encode()).hexdigest(), "tokens": len(tokens)},
        "n_ctx": n_ctx, "windows": n_windows, "scored_per_window": n_ctx - 1 - n_ctx // 2,
        "method": "llama-perplexity's: whole windows, BOS first, the second half of each scored",
        "bundles": entries,
    }
    if tasks is not None:
        report["tasks"] = {"source": str(tasks), "sha256": sha256_file(Path(tasks)),
                           "method": "greedy replies, a fresh conversation each; choices by log-likelihood"}
    return report


def _beside(path: Path) -> Path:
    """The eval record beside a bundle folder or GGUF file (the bundle itself is never changed)."""
    return path.with_name(path.name + ".eval.json")
