"""PNG plots of a profile report: decode speed against context, TTFT breakdown, memory over time.

Matplotlib's object API with the Agg canvas: no pyplot, no global figure state, no display
needed (Jetsons and CI machines are headless). With several bundles every plot shares
axes, one colour per bundle, so quantisations or backends compare at a glance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import require
from ..fsutil import atomic_file
from .report import CONCURRENCY_PLOT, PLOTS

COMPONENTS = [  # TTFT parts, bottom to top
    ("tokenize_s", "template + tokenize", "#9e9e9e"),
    ("encode_s", "encoders", "#8e44ad"),
    ("prefill_s", "prefill", "#1f77b4"),
    ("first_token_s", "first token", "#ff7f0e"),
]


def _figure(width: float, height: float):
    require("matplotlib", "profile")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(n: int) -> list[str]:
    base = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
    return [base[i % len(base)] for i in range(n)]


def _save(fig: Any, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_plots(out: Path, report: dict[str, Any]) -> dict[str, Path]:
    paths = {name: Path(out) / rel for name, rel in PLOTS.items()}
    paths["decode_vs_context"].parent.mkdir(parents=True, exist_ok=True)
    _save(decode_vs_context(report), paths["decode_vs_context"])
    _save(ttft_breakdown(report), paths["ttft_breakdown"])
    _save(memory_over_time(report), paths["memory_over_time"])
    from .speculative import speculative_bundles, speculative_plot

    if speculative_bundles(report):  # drawn when the scenario ran
        _save(speculative_plot(report, _figure), paths["speculative"])
    else:
        del paths["speculative"]
    if any((b["scenarios"].get("concurrency") or {}).get("levels") for b in report["bundles"]):
        name, rel = CONCURRENCY_PLOT
        paths[name] = _save(concurrency(report), Path(out) / rel)
    return paths


def concurrency(report: dict[str, Any]):
    """Aggregate and per-stream tokens/s (left) and TTFT (right) against the number of clients."""
    fig = _figure(10.0, 4.2)
    tps_ax, ttft_ax = fig.subplots(1, 2)
    for b, color in zip(report["bundles"], _colors(len(report["bundles"]))):
        levels = [lv for lv in (b["scenarios"].get("concurrency") or {}).get("levels") or [] if lv.get("aggregate_tps")]
        if not levels:
            continue
        xs = [lv["clients"] for lv in levels]

        def med(key: str, scale: float = 1.0) -> list[float]:
            return [((lv.get(key) or {}).get("median") or 0.0) * scale for lv in levels]

        tps_ax.plot(xs, med("aggregate_tps"), marker="o", color=color, label=f"{b['label']} aggregate")
        tps_ax.plot(xs, med("per_stream_tps"), marker="s", ls="--", color=color, label=f"{b['label']} per stream")
        ttft_ax.plot(xs, med("ttft_s", 1e3), marker="o", color=color, label=f"{b['label']} median stream")
        ttft_ax.plot(xs, med("ttft_max_s", 1e3), marker="^", ls=":", color=color, label=f"{b['label']} slowest stream")
    ticks = sorted({lv["clients"] for b in report["bundles"]
                    for lv in (b["scenarios"].get("concurrency") or {}).get("levels") or []})
    for ax, ylabel, title in ((tps_ax, "tokens/s (median of runs)", "Throughput"),
                              (ttft_ax, "time to first token, ms", "Time to first token")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle("Concurrent clients (continuous batching)")
    return fig


def _ok(sc: dict[str, Any]) -> bool:
    return sc.get("status") == "ok" and bool(sc.get("summary"))


def decode_vs_context(report: dict[str, Any]):
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    for b, color in zip(report["bundles"], _colors(len(report["bundles"]))):
        pts = []
        for sc in b["scenarios"].values():
            s = sc.get("summary") or {}
            if _ok(sc) and sc["kind"] in ("chat", "prompt") and s.get("decode_tps") and s.get("context_mean"):
                pts.append((s["context_mean"]["median"], s["decode_tps"]))
        pts.sort(key=lambda p: p[0])
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ys = [p[1]["median"] for p in pts]
        err = [[p[1]["median"] - p[1]["q1"] for p in pts], [p[1]["q3"] - p[1]["median"] for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=color, label=b["label"])
    ax.set_xlabel("context length while decoding (tokens)")
    ax.set_ylabel("decode tokens/s (median, q1-q3)")
    ax.set_title("Decode speed against context")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if ax.has_data():
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no decode measurements", ha="center", va="center", transform=ax.transAxes)
    return fig


def ttft_breakdown(report: dict[str, Any]):
    bundles = report["bundles"]
    names: list[str] = []
    for b in bundles:
        for name, sc in b["scenarios"].items():
            if _ok(sc) and sc["kind"] in ("chat", "prompt", "image", "audio") and name not in names:
                names.append(name)
    n = max(len(names), 1)
    fig = _figure(max(3.2 * n, 6.0), 4.2)
    axes = fig.subplots(1, n, squeeze=False)[0]
    labels = [b["label"] for b in bundles]
    for ax, name in zip(axes, names):
        bottoms = [0.0] * len(bundles)
        for key, legend, color in COMPONENTS:
            values = []
            for b in bundles:
                s = (b["scenarios"].get(name) or {}).get("summary") or {}
                values.append((s.get(key) or {}).get("median", 0.0) * 1e3)
            if any(values):
                ax.bar(labels, values, bottom=bottoms, color=color, label=legend)
                bottoms = [a + v for a, v in zip(bottoms, values)]
        ax.set_title(name)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("time to first token, ms (medians)")
    if names:
        handles, legends = axes[0].get_legend_handles_labels()
        fig.legend(handles, legends, loc="outside lower center", ncols=len(legends))
    else:
        axes[0].text(0.5, 0.5, "no TTFT measurements", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle("Time to first token, by part")
    return fig


def memory_over_time(report: dict[str, Any]):
    bundles = report["bundles"]
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    for b, color in zip(bundles, _colors(len(bundles))):
        tl = b.get("timeline") or {}
        rss = tl.get("rss") or []
        if rss:
            ax.plot([t for t, _ in rss], [v / 1e6 for _, v in rss], color=color, label=f"{b['label']} RSS")
        device = tl.get("device") or []
        dev_pts = [(d["t"], d.get("process_bytes") or d.get("used_bytes")) for d in device if "gpu" in d]
        if dev_pts and any(v for _, v in dev_pts):
            ax.plot([t for t, _ in dev_pts], [(v or 0) / 1e6 for _, v in dev_pts], color=color, ls="--",
                    label=f"{b['label']} GPU memory (NVML)")
        jet = [(d["t"], d["ram_used_mb"]) for d in device if d.get("ram_used_mb") is not None]
        if jet:
            ax.plot([t for t, _ in jet], [v * 1.048576 for _, v in jet], color=color, ls=":",
                    label=f"{b['label']} shared RAM in use (tegrastats)")
        marks = tl.get("marks") or []
        raw_at = next((t for t, m in marks if m == "overhead"), None)
        if raw_at is not None and rss:
            ax.axvspan(raw_at, rss[-1][0], color=color, alpha=0.08)
        if len(bundles) == 1:
            for t, mark in marks:
                ax.axvline(t, color="#999999", lw=0.8, ls=":")
                ax.text(t, 0.02, f" {mark}", rotation=90, transform=ax.get_xaxis_transform(),
                        fontsize=7, color="#555555", va="bottom")
    ax.set_xlabel("seconds since the bundle's profile started (shaded: raw llama-cpp-python also loaded)")
    ax.set_ylabel("MB")
    ax.set_ylim(bottom=0)
    ax.set_title("Memory over time")
    ax.grid(True, alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=8)
    return fig
