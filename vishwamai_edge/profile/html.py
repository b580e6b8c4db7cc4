"""One self-contained HTML page of a profile: tables, notes and the plots inlined as data URIs.

No scripts, no external files: it opens from an e-mail attachment or a copied folder.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from .report import Table, bundle_detail_table, comparison_tables

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222;
       padding: 0 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5rem 0; }
.note { color: #555; font-size: 0.85rem; }
.status { font-weight: bold; }
"""


def _table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return f"<h3>{html.escape(t.title)}</h3><table><tr>{head}</tr>{body}</table>{note}"


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(report: dict[str, Any], out: Path) -> str:
    h = report["host"]
    s = report["settings"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>vishwamai-edge profile</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>vishwamai-edge profile</h1>",
        f"<p class='status'>Status: {html.escape(report['status'])} · {html.escape(report['created'])}</p>",
        f"<p>Host: {html.escape(str(h.get('system')))}, {html.escape(str(h.get('cpu')))}, "
        f"{html.escape(str(h.get('physical_cpus', '?')))} cores; GPU: {html.escape(str(h.get('gpu', '-')))}; "
        f"Jetson: {html.escape(str(h.get('module') if h.get('jetson') else 'no'))}</p>",
        f"<p>Scenarios {html.escape(', '.join(s['scenarios']))}; {s['warmup']} warm-up + {s['repeat']} runs; "
        f"threads {s['threads']}; context {s['n_ctx']}; {s['decode_tokens']} generated tokens per run.</p>",
        "<h2>Comparison</h2>",
    ]
    parts += [_table(t) for t in comparison_tables(report)]
    if report.get("plots"):
        parts.append("<h2>Plots</h2>")
        for name, rel in report["plots"].items():
            p = out / rel
            if p.is_file():
                parts.append(_image(p, name))
    parts.append("<h2>Bundles</h2>")
    parts += [_table(bundle_detail_table(b)) for b in report["bundles"]]
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report["notes"])
    parts.append(f"<h2>Notes</h2><ul>{notes}</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
