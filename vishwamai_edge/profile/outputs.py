"""The report's files in the output folder: JSON and Markdown as it runs, plots and HTML at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError
from ..fsutil import atomic_file, write_json
from .report import render_markdown


def write_outputs(out: Path, report: dict[str, Any], final: bool) -> list[Path]:
    """report.json and report.md always; plots and report.html when `final`. Atomic, each."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if final:
        try:
            from .plots import write_plots  # matplotlib: optional

            report["plots"] = {name: str(p.relative_to(out)) for name, p in write_plots(out, report).items()}
            written += [out / rel for rel in report["plots"].values()]
        except MissingDependencyError as exc:
            report["notes"].append(f"plots skipped: {exc}")
    write_json(out / "report.json", report)
    written.append(out / "report.json")
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(render_markdown(report))
    written.append(out / "report.md")
    if final:
        from .html import render_html

        with atomic_file(out / "report.html") as tmp:
            tmp.write_text(render_html(report, out))
        written.append(out / "report.html")
    return written
