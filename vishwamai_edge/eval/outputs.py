"""The eval report: report.json, report.md and report.html (tables, and the KL divergence histogram per bundle)."""

from __future__ import annotations

import base64
import html
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


def table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["bundle", *(h for _, h, _ in COLUMNS)]
    rows = []
    for b in report["bundles"]:
        cells = [b["name"] + (" (reference)" if b["reference"] else "")]
        cells += ["-" if b.get(k) is None else f.format(b[k]) for k, _, f in COLUMNS]
        rows.append(cells)
    return header, rows


def render_markdown(report: dict[str, Any]) -> str:
    header, rows = table(report)
    text = report["text"]
    lines = [f"# eval: {len(report['bundles'])} bundle(s) over {text['source']}", "",
             f"{text['tokens']} tokens, {report['windows']} windows of {report['n_ctx']}, "
             f"{report['scored_per_window']} scored in each ({report['method']}).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"![KL divergence per token]({'plots/' + PLOT})", ""]
    return "\n".join(lines)


def render_html(report: dict[str, Any], plot: Path | None) -> str:
    header, rows = table(report)
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    image = ""
    if plot is not None and plot.is_file():  # inline: the page is one file that opens offline
        data = base64.b64encode(plot.read_bytes()).decode()
        image = f'<img alt="KL divergence per token" src="data:image/png;base64,{data}">'
    return (f"<!doctype html><meta charset='utf-8'><title>vishwamai-edge eval</title>"
            f"<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}"
            f"td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style>"
            f"<h1>eval over {html.escape(report['text']['source'])}</h1>"
            f"<p>{report['text']['tokens']} tokens, {report['windows']} windows of {report['n_ctx']}.</p>"
            f"<table><tr>{cells}</tr>{body}</table>{image}")


def kld_histogram(report: dict[str, Any], klds: list[np.ndarray], path: Path) -> Path | None:
    """Each compared bundle's per-token KL divergence, log-spaced bins (most tokens sit near 0)."""
    compared = [(b["name"], k) for b, k in zip(report["bundles"], klds) if not b["reference"] and k.size]
    if not compared:
        return None
    require("matplotlib", "profile")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_outputs(out: Path, report: dict[str, Any], klds: list[np.ndarray]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    plot = kld_histogram(report, klds, out / "plots" / PLOT)
    write_json(out / "report.json", report)
    written = [out / "report.json"]
    for name, text in (("report.md", render_markdown(report)), ("report.html", render_html(report, plot))):
        with atomic_file(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(out / name)
    return written + ([plot] if plot else [])
