"""The eval report: report.json, report.md and report.html (tables, the KL divergence histogram per bundle and,
with tasks, accuracy bars), and answers.jsonl: every task's reply per bundle."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import require
from ..fsutil import atomic_file, write_json

COLUMNS = [  # (key, header, format)
    ("quant", "quant", "{}"), ("kv_type", "KV cache", "{}"), ("perplexity", "perplexity", "{:.4f}"),
    ("kld_mean", "mean KLD", "{:.5f}"), ("kld_median", "median KLD", "{:.5f}"), ("kld_p99", "99% KLD", "{:.4f}"),
    ("kld_max", "max KLD", "{:.4f}"), ("same_top", "same top", "{:.2%}"), ("delta_p_rms", "RMS Δp", "{:.3%}"),
    ("seconds", "seconds", "{:.1f}"),
]
PLOT = "kld.png"
ACCURACY_PLOT = "accuracy.png"


def row_name(b: dict[str, Any]) -> str:
    return b["name"] + (" (reference)" if b["reference"] else "")


def table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["bundle", *(h for _, h, _ in COLUMNS)]
    rows = []
    for b in report["bundles"]:
        rows.append([row_name(b), *("-" if b.get(k) is None else f.format(b[k]) for k, _, f in COLUMNS)])
    return header, rows


def task_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Accuracy per bundle: all tasks, then per kind of match."""
    if "tasks" not in report:
        return None
    kinds = sorted({m for b in report["bundles"] for m in b["tasks"]["by_match"]})
    header = ["bundle", "quant", "KV cache", "accuracy", *kinds]
    rows = []
    for b in report["bundles"]:
        t = b["tasks"]
        rows.append([row_name(b), b["quant"] or "-", b["kv_type"] or "-",
                     f"{t['accuracy']:.1%} ({t['right']}/{t['tasks']})",
                     *(f"{t['by_match'][k]['accuracy']:.1%}" if k in t["by_match"] else "-" for k in kinds)])
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _inline_png(plot: Path | None, alt: str) -> str:
    if plot is None or not plot.is_file():  # inline: the page is one file that opens offline
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()}">'


def render_markdown(report: dict[str, Any], plots: dict[str, Path | None]) -> str:
    text = report["text"]
    lines = [f"# eval: {len(report['bundles'])} row(s) over {text['source']}", "",
             f"{text['tokens']} tokens, {report['windows']} windows of {report['n_ctx']}, "
             f"{report['scored_per_window']} scored in each ({report['method']}).", "",
             *_markdown_table(*table(report))]
    if plots.get(PLOT):
        lines += ["", f"![KL divergence per token](plots/{PLOT})"]
    tasks = task_table(report)
    if tasks is not None:
        lines += ["", f"## Tasks: {report['tasks']['source']}", "", f"{report['tasks']['method']}.", "",
                  *_markdown_table(*tasks)]
        if plots.get(ACCURACY_PLOT):
            lines += ["", f"![accuracy per bundle](plots/{ACCURACY_PLOT})"]
    return "\n".join([*lines, ""])


def render_html(report: dict[str, Any], plots: dict[str, Path | None]) -> str:
    tasks = task_table(report)
    task_part = "" if tasks is None else (
        f"<h2>tasks: {html.escape(report['tasks']['source'])}</h2>{_html_table(*tasks)}"
        + _inline_png(plots.get(ACCURACY_PLOT), "accuracy per bundle"))
    return (f"<!doctype html><meta charset='utf-8'><title>vishwamai-edge eval</title>"
            f"<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}"
            f"td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style>"
            f"<h1>eval over {html.escape(report['text']['source'])}</h1>"
            f"<p>{report['text']['tokens']} tokens, {report['windows']} windows of {report['n_ctx']}.</p>"
            f"{_html_table(*table(report))}{_inline_png(plots.get(PLOT), 'KL divergence per token')}{task_part}")


def _figure():
    require("matplotlib", "profile")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def kld_histogram(report: dict[str, Any], klds: list[np.ndarray], path: Path) -> Path | None:
    """Each compared bundle's per-token KL divergence, log-spaced bins (most tokens sit near 0)."""
    compared = [(_short(b), k) for b, k in zip(report["bundles"], klds) if not b["reference"] and k.size]
    if not compared:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    low = max(min(float(k[k > 0].min()) if (k > 0).any() else 1e-6 for _, k in compared), 1e-8)
    high = max(float(k.max()) for _, k in compared) * 1.01 + 1e-12
    bins = np.geomspace(low, max(high, low * 10), 60)
    for name, k in compared:
        ax.hist(np.clip(k, low, None), bins=bins, histtype="step", linewidth=1.5, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("KL divergence from the reference, per token (nats)")
    ax.set_ylabel("tokens")
    ax.legend(fontsize=8)
    return _save(fig, path)


def accuracy_bars(report: dict[str, Any], path: Path) -> Path | None:
    """Each row's task accuracy, one bar per row."""
    if "tasks" not in report:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    names = [_short(b) for b in report["bundles"]]
    values = [100 * b["tasks"]["accuracy"] for b in report["bundles"]]
    bars = ax.bar(range(len(names)), values, color="#4c72b0")
    ax.bar_label(bars, fmt="%.1f%%", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    return _save(fig, path)


def _short(b: dict[str, Any]) -> str:
    return f"{b['quant'] or b['name']}, KV {b['kv_type']}"


def write_outputs(out: Path, report: dict[str, Any], klds: list[np.ndarray],
                  answers: list[list[dict[str, Any]]] | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    plots = {PLOT: kld_histogram(report, klds, out / "plots" / PLOT),
             ACCURACY_PLOT: accuracy_bars(report, out / "plots" / ACCURACY_PLOT)}
    write_json(out / "report.json", report)
    written = [out / "report.json"]
    texts = [("report.md", render_markdown(report, plots)), ("report.html", render_html(report, plots))]
    if answers:
        texts.append(("answers.jsonl", answer_lines(report, answers)))
    for name, text in texts:
        with atomic_file(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(out / name)
    return written + [p for p in plots.values() if p]


def answer_lines(report: dict[str, Any], answers: list[list[dict[str, Any]]]) -> str:
    """One JSON line per (row, task): the reply (or picked choice) and whether it was right."""
    lines = []
    for i, (b, rows) in enumerate(zip(report["bundles"], answers)):
        lines += [json.dumps({"row": i, "bundle": b["path"], "kv_type": b["kv_type"], **a}) for a in rows]
    return "".join(line + "\n" for line in lines)
