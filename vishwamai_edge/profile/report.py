"""The profile report: one versioned JSON document, rendered as Markdown, plots and HTML.

report.json is the record (schema "vishwamai-edge/profile", version below); report.md and
report.html are views of it and can be regenerated from it. Every file is written under a
temporary name and renamed, so a reader never sees half a report.

report.json, schema version 1:
    schema, schema_version, tool_version, created, finished, status (running | complete | interrupted)
    host       system, cpu, cores, memory, load averages, and doctor's view (Jetson module, GPU, CUDA)
    settings   scenarios, repeat, warmup, threads, n_ctx, decode_tokens, target_override, kv_type_override
    notes      how to read the numbers (approximations, skipped scenarios, a busy machine)
    plots      name -> path relative to the report folder
    bundles[]  name, label, path, backend, quant, file_bytes, tensor_types, model (GGUF shape),
               bandwidth {target, gbs, source}, load {verify_s, load_s, runs_s}, memory (RSS bytes),
               backend_memory, device (NVML / tegrastats / jtop summary or absent), status,
               kv_cache {type, cells, bytes (llama.cpp's report), formula_bytes, f16_bytes,
                         quality {max_abs_logit_diff, top1_agreement, ...} against an f16 cache},
               scenarios {name: {kind, status (ok | skipped | failed), reason | error, runs[], summary}},
               (the concurrency scenario adds levels[] {clients, aggregate_tps, per_stream_tps,
                ttft_s, ttft_max_s}, each a summary over its runs)
               timeline {rss [[t, bytes]], marks [[t, scenario]], device [...]}
    A summary maps each measured key (ttft_s, prefill_tps, decode_tps, roofline_ratio, ...) to
    {median, q1, q3, min, max, stdev, n}; runs[] keep every measured run's raw numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..runtime.generation_stats import DECODE_RATE_DEFINITION
from .roofline import APPROXIMATION

SCHEMA = "vishwamai-edge/profile"
SCHEMA_VERSION = 1
PLOTS = {
    "decode_vs_context": "plots/decode_vs_context.png",
    "ttft_breakdown": "plots/ttft_breakdown.png",
    "memory_over_time": "plots/memory_over_time.png",
    "speculative": "plots/speculative.png",
}
CONCURRENCY_PLOT = ("concurrency", "plots/concurrency.png")  # drawn when a bundle ran the scenario


def new_report(settings: dict[str, Any], host: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "running",  # running | complete | interrupted
        "host": host,
        "settings": settings,
        "notes": [],
        "bundles": [],
    }


def load_report(path: Path | str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path} is not a {SCHEMA} report of schema version {SCHEMA_VERSION}")
    return data


def short_labels(names: list[str]) -> list[str]:
    """Bundle names without the prefix they all share ("smollm2-135m-laptop-cpu-f16" -> "f16")."""
    if len(names) < 2:
        return list(names)
    prefix = os.path.commonprefix(names)
    cut = prefix.rfind("-") + 1
    labels = [n[cut:] for n in names]
    if any(not label for label in labels):
        labels = list(names)
    seen: dict[str, int] = {}
    out = []
    for label in labels:  # the same bundle twice still needs two labels
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def add_summary_notes(report: dict[str, Any]) -> None:
    notes = report["notes"]
    s = report["settings"]
    notes.append(
        f"each scenario: {s['warmup']} warm-up run(s), then {s['repeat']} measured; tables show the median "
        "and, in brackets, the interquartile range (q1-q3) of the measured runs"
    )
    notes.append(
        f"{DECODE_RATE_DEFINITION}; "
        "context = prompt tokens + half the generated tokens; the KV cache is emptied before every run"
    )
    notes.append(APPROXIMATION)
    encoder_scenarios = [
        (b["label"], name) for b in report["bundles"] for name, sc in b["scenarios"].items()
        if sc.get("kind") in ("image", "audio")
    ]
    if encoder_scenarios and all(not {"image", "audio"} & set(b.get("encoders") or []) for b in report["bundles"]):
        notes.append(
            "image and audio scenarios run only when a bundle's manifest lists encoders (manifest "
            "'encoders': image / audio); none of these bundles has any, so they are reported as skipped"
        )
    forced = sum(r.get("forced_tokens", 0) for b in report["bundles"] for sc in b["scenarios"].values()
                 for r in sc.get("runs", []))
    if forced:
        notes.append(f"{forced} generated tokens in prompt scenarios came after the model chose to end "
                     "(greedy over the other tokens), so every run decodes the same number of tokens")
    busy = _busy(report)
    if busy:
        notes.append(busy)
    sources = {b.get("device_source") for b in report["bundles"]}
    if sources == {None}:
        notes.append("no GPU or Jetson readings: no NVML-visible NVIDIA GPU and not a Jetson; memory is this "
                     "process's RSS")
    report["notes"] = list(dict.fromkeys(notes))


def _busy(report: dict[str, Any]) -> str | None:
    """A warning when other work shared the CPUs: llama.cpp's threads wait on each other, and a
    descheduled thread stalls them all, so contended numbers can be several times too slow."""
    cpus = report["host"].get("logical_cpus") or 1
    loads = [report["host"].get("loadavg_at_start")]
    loads += [b.get("memory", {}).get("loadavg") for b in report["bundles"]]
    worst = max((la[0] for la in loads if la), default=0.0)
    threads = report["settings"].get("threads") or cpus
    if worst > cpus + 0.5:  # more runnable threads than CPUs, this profile's own included
        return (f"the machine was busy (1-minute load average up to {worst:.1f} on {cpus} CPUs, this profile "
                f"using {threads} threads): other work shared the cores, so absolute speeds are low and "
                "noisy; compare bundles within this report, not with other machines")
    return None


# ---------------------------------------------------------------------------------------------
# Tables: built once, rendered as Markdown and as HTML
# ---------------------------------------------------------------------------------------------


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


def fmt(summary: dict[str, Any] | None, scale: float = 1.0, digits: int = 1, spread: bool = True) -> str:
    if not summary:
        return "-"
    med = summary["median"] * scale
    text = f"{med:.{digits}f}"
    if spread and summary.get("n", 1) > 1:
        text += f" ({summary['q1'] * scale:.{digits}f}-{summary['q3'] * scale:.{digits}f})"
    return text


def _mb(n: float | None) -> str:
    return f"{n / 1e6:.1f}" if n is not None else "-"


def _scenario_names(report: dict[str, Any], kinds: tuple[str, ...]) -> list[str]:
    names: list[str] = []
    for b in report["bundles"]:
        for name, sc in b["scenarios"].items():
            if sc.get("kind") in kinds and sc.get("status") == "ok" and name not in names:
                names.append(name)
    order = report["settings"]["scenarios"]
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


def _metric(b: dict[str, Any], scenario: str, key: str) -> dict[str, Any] | None:
    sc = b["scenarios"].get(scenario) or {}
    return (sc.get("summary") or {}).get(key)


def comparison_tables(report: dict[str, Any]) -> list[Table]:
    bundles = report["bundles"]
    tables = []
    rows = []
    for b in bundles:
        mem = b.get("memory", {})
        rows.append([
            b["label"], str(b.get("quant") or "-"), _mb(b.get("file_bytes")),
            fmt((b.get("load") or {}).get("load_s"), 1e3, 0),
            f"{_mb(mem.get('peak_rss_bytes'))} (+{_mb(mem.get('peak_rss_over_baseline_bytes'))})"
            if mem.get("peak_rss_bytes") else "-",
            fmt(_metric(b, "chat", "ttft_s"), 1e3, 1),
            fmt(_metric(b, "chat", "decode_tps"), 1, 1),
            fmt(_metric(b, "overhead", "overhead_ratio"), 1, 2),
        ])
    tables.append(Table(
        "Side by side",
        ["bundle", "quant", "GGUF MB", "load ms", "peak RSS MB (+ over pre-load)", "chat TTFT ms",
         "chat decode tok/s", "runtime / raw llama-cpp decode"],
        rows,
        "peak RSS: sampled every 50 ms while the bundle's own scenarios ran (the overhead scenario's second, "
        "raw llama-cpp-python copy excluded); + over pre-load: minus the process's RSS before the bundle "
        "loaded",
    ))
    per_scenario = [
        ("Decode tokens/s against context", "decode_tps", 1.0, 1, ("chat", "prompt")),
        ("Time to first token, ms", "ttft_s", 1e3, 1, ("chat", "prompt", "image", "audio")),
        ("Prefill tokens/s", "prefill_tps", 1.0, 0, ("chat", "prompt")),
        ("Roofline ratio of decode, %", "roofline_ratio", 100.0, 2, ("chat", "prompt")),
    ]
    for title, key, scale, digits, kinds in per_scenario:
        names = _scenario_names(report, kinds)
        if not names:
            continue
        headers = ["bundle"] + [_with_context(bundles, n) for n in names]
        note = ""
        if key == "roofline_ratio":
            headers.insert(1, "peak GB/s")
            note = APPROXIMATION
        body = []
        for b in bundles:
            row = [b["label"]] + [fmt(_metric(b, n, key), scale, digits) for n in names]
            if key == "roofline_ratio":
                bw = b.get("bandwidth")
                row.insert(1, f"{bw['gbs']:g} ({bw['target']}, {bw['source']})" if bw else "-")
            body.append(row)
        tables.append(Table(title, headers, body, note))
    from .speculative import SPECULATIVE_TABLE, speculative_rows

    spec_rows = speculative_rows(bundles, fmt)
    if spec_rows:
        tables.append(Table(SPECULATIVE_TABLE[0], SPECULATIVE_TABLE[1], spec_rows, SPECULATIVE_TABLE[2]))
    tables += kv_cache_tables(bundles) + concurrency_tables(bundles)
    device_rows = [_device_row(b) for b in bundles if b.get("device")]
    if device_rows:
        tables.append(Table(
            "Device readings",
            ["bundle", "source", "memory peak MB", "GPU load % (median)", "power W (median)",
             "power W (peak)"],
            device_rows,
        ))
    return tables


def kv_cache_tables(bundles: list[dict[str, Any]]) -> list[Table]:
    rows = []
    for b in bundles:
        kv = b.get("kv_cache")
        if not kv:
            continue
        q = kv.get("quality") or {}
        ratio = f"{kv['bytes'] / kv['f16_bytes']:.3f}" if kv.get("bytes") and kv.get("f16_bytes") else "-"
        agree = q.get("top1_agreement")
        rows.append([b["label"], kv["type"], str(kv["cells"]), _mb(kv.get("bytes")), _mb(kv.get("formula_bytes")),
                     ratio, f"{q['max_abs_logit_diff']:.4f}" if "max_abs_logit_diff" in q else "-",
                     f"{agree * 100:.1f}" if agree is not None else "-"])
    if not rows:
        return []
    return [Table("KV cache", ["bundle", "type", "cells", "MB (llama.cpp)", "MB (formula)", "of f16",
                               "max |logit diff| vs f16", "top-1 agreement %"], rows,
                  "MB (llama.cpp): the K and V buffers llama.cpp reported allocating; formula: n_layer x cells x "
                  "n_head_kv x (head_dim_k + head_dim_v) x bytes per element (q8_0 34/32, q4_0 18/32); the logit "
                  "difference is the largest over every position of fixed prompts, against the same GGUF with an "
                  "f16 cache")]


def concurrency_tables(bundles: list[dict[str, Any]]) -> list[Table]:
    rows = []
    for b in bundles:
        sc = b["scenarios"].get("concurrency") or {}
        for lv in sc.get("levels") or []:
            rows.append([b["label"], str(lv["clients"]), fmt(lv.get("aggregate_tps")), fmt(lv.get("per_stream_tps")),
                         fmt(lv.get("ttft_s"), 1e3, 0), fmt(lv.get("ttft_max_s"), 1e3, 0)])
    if not rows:
        return []
    return [Table("Concurrency", ["bundle", "clients", "aggregate tok/s", "per-stream tok/s",
                                  "TTFT ms (median stream)", "TTFT ms (slowest stream)"], rows,
                  "N greedy requests sent at once to the serving engine (one slot each, decoded together); "
                  "aggregate: all streams' tokens / wall time from the first request to the last reply; "
                  "TTFT: request sent to first text")]


def _with_context(bundles: list[dict[str, Any]], name: str) -> str:
    ctx = [_metric(b, name, "context_mean") for b in bundles]
    ctx = [c["median"] for c in ctx if c]
    return f"{name} (ctx {ctx[0]:.0f})" if ctx else name


def _device_row(b: dict[str, Any]) -> list[str]:
    d = b["device"]
    if d.get("source") == "nvml":
        dev = next(iter(d["devices"].values()), {})
        peak = dev.get("peak_process_bytes") or dev.get("peak_used_bytes")
        power = dev.get("power_mw")
        return [b["label"], f"NVML {dev.get('name', '')}".strip(), _mb(peak),
                fmt(dev.get("util_pct"), 1, 0, False), fmt(power, 1e-3, 1, False),
                f"{power['max'] / 1e3:.1f}" if power else "-"]
    ram = d.get("ram_used_mb")
    power = d.get("total_power_mw")
    src = f"{d.get('source')} ({d.get('total_power_source') or 'no rails'})"
    ram_text = f"{ram['max'] * 1.048576:.0f} (shared RAM)" if ram else "-"  # tegrastats MB are MiB
    return [b["label"], src, ram_text, fmt(d.get("gpu_load_pct"), 1, 0, False),
            fmt(power, 1e-3, 2, False), f"{power['max'] / 1e3:.2f}" if power else "-"]


def bundle_detail_table(b: dict[str, Any]) -> Table:
    rows = []
    for name, sc in b["scenarios"].items():
        if sc.get("status") != "ok":
            rows.append([name, sc.get("status", "?"), sc.get("reason") or sc.get("error") or ""] + ["-"] * 5)
            continue
        s = sc.get("summary") or {}
        extra = "by client count in the Concurrency table" if sc.get("kind") == "concurrency" else ""
        if "overhead_ratio" in s:
            extra = (f"raw llama-cpp {fmt(s.get('raw_decode_tps'))} tok/s; "
                     f"ratio {fmt(s.get('overhead_ratio'), 1, 2)}")
        rows.append([
            name, "ok", extra,
            fmt(s.get("prompt_tokens"), 1, 0, False),
            fmt(s.get("ttft_s"), 1e3, 1),
            fmt(s.get("prefill_tps"), 1, 0),
            fmt(s.get("decode_tps"), 1, 1),
            fmt(s.get("roofline_ratio"), 100, 2),
        ])
    return Table(
        f"{b['label']}: {b['name']}",
        ["scenario", "status", "note", "prompt tokens", "TTFT ms", "prefill tok/s", "decode tok/s",
         "roofline %"],
        rows,
    )


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _md_table(t: Table) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in t.rows]
    lines = [f"### {t.title}", "", "| " + " | ".join(t.headers) + " |", "|" + " --- |" * len(t.headers)]
    lines += ["| " + " | ".join(row) + " |" for row in esc]
    if t.note:
        lines += ["", f"_{t.note}_"]
    return "\n".join(lines) + "\n"


def render_markdown(report: dict[str, Any]) -> str:
    h = report["host"]
    s = report["settings"]
    out = [
        "# vishwamai-edge profile",
        "",
        f"Status: **{report['status']}** · created {report['created']} · schema {report['schema']} "
        f"v{report['schema_version']}",
        "",
        f"Host: {h.get('system')}, {h.get('cpu') or 'unknown CPU'}, {h.get('physical_cpus', '?')} cores / "
        f"{h.get('logical_cpus', '?')} threads, {h.get('memory_gib', '?')} GiB; GPU: {h.get('gpu', '-')}; "
        f"Jetson: {h.get('module', '-') if h.get('jetson') else 'no'}; "
        f"llama-cpp-python {h.get('llama_cpp', '?')}; "
        f"load average at start {h.get('loadavg_at_start') or '-'}",
        "",
        f"Settings: scenarios {', '.join(s['scenarios'])}; {s['warmup']} warm-up + {s['repeat']} runs; "
        f"threads {s['threads']}; context {s['n_ctx']}; {s['decode_tokens']} generated tokens per run",
        "",
        "## Comparison",
        "",
    ]
    out += [_md_table(t) for t in comparison_tables(report)]
    if report.get("plots"):
        out += ["## Plots", ""]
        out += [f"![{name}]({rel})" for name, rel in report["plots"].items()]
        out.append("")
    out += ["## Bundles", ""]
    for b in report["bundles"]:
        out.append(_md_table(bundle_detail_table(b)))
        mem = b.get("memory", {})
        m = b.get("model", {})
        bm = b.get("backend_memory") or {}
        load = b.get("load") or {}
        out.append(
            f"- file `{b.get('file')}` {_mb(b.get('file_bytes'))} MB, "
            f"{m.get('arch')} {m.get('n_layer')} layers, "
            f"{m.get('n_head')} heads / {m.get('n_head_kv')} KV heads of {m.get('head_dim_k')}; "
            f"tensor types {b.get('tensor_types') or '-'}\n"
            f"- load {fmt(load.get('load_s'), 1e3, 0)} ms (sha256 check of the bundle "
            f"{(load.get('verify_s') or 0) * 1e3:.0f} ms, not included)\n"
            f"- RSS: {_mb(mem.get('baseline_rss_bytes'))} MB before load, "
            f"{_mb(mem.get('rss_after_load_bytes'))} MB "
            f"after, peak {_mb(mem.get('peak_rss_bytes'))} MB; process high-water mark (getrusage) so far "
            f"{_mb(mem.get('process_maxrss_bytes'))} MB; llama.cpp weights {_mb(bm.get('model_bytes'))} MB, "
            f"KV cache {_mb(bm.get('kv_cache_bytes') or bm.get('kv_cache_bytes_f16'))} MB "
            f"({(b.get('kv_cache') or {}).get('type', 'f16')}, {b.get('n_ctx')} positions)"
            + (f"; with raw llama-cpp-python also loaded (overhead scenario) "
               f"{_mb(mem['peak_rss_with_raw_llama_bytes'])} MB"
               if mem.get("peak_rss_with_raw_llama_bytes") else "")
            + f"; load average after {mem.get('loadavg') or '-'}\n"
            f"- status {b.get('status')}" + (f", interrupted during {b['interrupted_during']}"
                                              if b.get("interrupted_during") else "")
            + (f"; device readings unavailable: {b['device_error']}" if b.get("device_error") else "")
            + "\n"
        )
    out += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(out)
