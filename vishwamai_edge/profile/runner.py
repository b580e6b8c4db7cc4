"""`vishwamai-edge profile`: scenarios x bundles -> report.json, report.md, plots, report.html.

The report is rewritten (atomically) after every finished scenario, so a profile that is
killed or interrupted leaves a valid report of what finished; Ctrl-C additionally marks it
"interrupted" and draws the plots of what is there before the interrupt is passed on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import UserError
from ..runtime.bundle import Bundle
from ..runtime.options import RuntimeOptions
from ..targets import get_target
from . import report as rpt
from .gguf_meta import ModelShape, model_shape
from .monitors import RssSampler, device_monitor, is_jetson, process_maxrss_bytes
from .outputs import write_outputs
from .roofline import bytes_per_token, roofline_ratio
from .scenarios import (
    CHAT_QUESTION,
    IMAGE_QUESTION,
    SECOND_COPY,
    PlannedScenario,
    Scenario,
    context_for,
    parse_names,
    plan,
)
from .stats import summarize

SUMMARY_KEYS = (
    "ttft_s", "tokenize_s", "encode_s", "prefill_s", "first_token_s", "prefill_tps", "decode_tps",
    "roofline_ratio", "raw_decode_tps", "overhead_ratio", "prompt_tokens", "decode_tokens", "context_mean",
    "transcribe_s", "audio_s", "rtf", "answer_ttft_s",
    "plain_decode_tps", "spec_decode_tps", "speedup", "acceptance", "mismatches",
)


@dataclass
class ProfileResult:
    out_dir: Path
    report: dict[str, Any]


@dataclass
class _Target:
    bundle: Bundle
    path: Path
    shape: ModelShape
    verify_s: float


def run_profile(
    bundles: list[Path],
    out: Path,
    scenarios: str | list[str] | None = None,
    repeat: int = 3,
    warmup: int = 1,
    options: RuntimeOptions | None = None,
    target: str | None = None,
    decode_tokens: int = 64,
    console: Console | None = None,
) -> ProfileResult:
    """Profile each bundle with the same scenarios; write the report into `out`. `options`: threads,
    context (default: the smallest that fits the scenarios) and a KV-cache type for every bundle
    (default: each bundle's own)."""
    options = options or RuntimeOptions()
    threads, n_ctx, kv_type = options.n_threads, options.n_ctx, options.kv_type
    console = console or Console(stderr=True)
    if not bundles:
        raise UserError("name at least one bundle to profile")
    if repeat < 1 or warmup < 0 or decode_tokens < 2:
        raise UserError("--repeat must be at least 1, --warmup at least 0 and --decode-tokens at least 2")
    names = parse_names(scenarios)
    from ..runtime.backends.llamacpp import default_threads

    threads = threads or default_threads()
    override = get_target(target) if target else None

    # Open and verify every bundle before any long work: a bad path fails in a second.
    targets = []
    for p in bundles:
        b = Bundle.load(p, verify=False)
        t = time.perf_counter()
        b.verify()
        targets.append(_Target(b, Path(p), model_shape(b.llm_path()), time.perf_counter() - t))
    image_rows = max([t.bundle.manifest.encoders["image"].n_tokens or 0 for t in targets
                      if "image" in t.bundle.manifest.encoders] + [0])
    n_ctx = n_ctx or context_for(names, decode_tokens, image_rows)

    report = rpt.new_report(
        settings={"scenarios": names, "repeat": repeat, "warmup": warmup, "threads": threads,
                  "n_ctx": n_ctx, "decode_tokens": decode_tokens, "target_override": target,
                  "kv_type_override": kv_type},
        host=_host(),
    )
    labels = rpt.short_labels([t.bundle.name for t in targets])
    out = Path(out)
    plans = [plan(names, t.bundle.manifest, n_ctx, decode_tokens) for t in targets]
    total = sum(repeat + sum(warmup + repeat for p in pl if p.skip_reason is None) for pl in plans)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=False)
    try:
        with progress:
            task = progress.add_task("profile", total=total)
            for tgt, label, planned in zip(targets, labels, plans):
                entry = _new_entry(tgt, label, threads, n_ctx, override)
                report["bundles"].append(entry)
                _profile_bundle(tgt, entry, planned, repeat, warmup, threads, n_ctx, decode_tokens,
                                progress, task, report, out, kv_type)
        report["status"] = "complete"
    except KeyboardInterrupt:
        report["status"] = "interrupted"
        report["notes"].append("interrupted (Ctrl-C): the scenarios that finished are reported, "
                               "the rest are not")
        _finish(report, out, console)
        raise
    _finish(report, out, console)
    return ProfileResult(out, report)


def _finish(report: dict[str, Any], out: Path, console: Console) -> None:
    report["finished"] = _now()
    report["process_maxrss_bytes"] = process_maxrss_bytes()
    rpt.add_summary_notes(report)
    written = write_outputs(out, report, final=True)
    console.print(f"[bold green]profile {report['status']}:[/] {out}  ({', '.join(p.name for p in written)})")


def _profile_bundle(
    tgt: _Target, entry: dict[str, Any], planned: list[PlannedScenario], repeat: int, warmup: int,
    threads: int, n_ctx: int, decode_tokens: int, progress: Progress, task: Any,
    report: dict[str, Any], out: Path, kv_type: str | None = None,
) -> None:
    from ..runtime.pipeline import Pipeline

    rss = RssSampler()
    device = device_monitor()
    pipeline = None
    raw = None
    engine = None  # the concurrency scenario's, with a slot per client
    clip = None
    current = "load"
    rss.start()
    if device is not None:
        device.start()
    try:
        rss.mark("load")
        loads = []
        for i in range(repeat):
            progress.update(task, description=f"{entry['label']}: load")
            t = time.perf_counter()
            pipeline = Pipeline.load(tgt.path, RuntimeOptions(n_ctx=n_ctx, n_threads=threads, kv_type=kv_type,
                                                              verify=False))
            loads.append(time.perf_counter() - t)
            if i < repeat - 1:
                pipeline.close()
            progress.advance(task)
        assert pipeline is not None
        entry["load"] = {"verify_s": tgt.verify_s, "load_s": summarize(loads), "runs_s": loads}
        entry["memory"]["rss_after_load_bytes"] = rss.samples[-1][1] if rss.samples else None
        mem = pipeline.llm.memory()
        entry["backend_memory"] = {"model_bytes": mem.model_bytes, "context_bytes": mem.context_bytes,
                                   "kv_cache_bytes_f16": tgt.shape.kv_bytes_per_position() * n_ctx,
                                   "kv_cache_bytes": mem.kv_cache_bytes}
        if getattr(pipeline.llm, "kv_report", None) is not None:
            from .kv_cache import kv_entry

            progress.update(task, description=f"{entry['label']}: KV cache against f16")
            entry["kv_cache"] = kv_entry(pipeline.llm, tgt.shape, threads)

        for ps in planned:
            s = ps.scenario
            if ps.skip_reason:
                entry["scenarios"][s.name] = {"kind": s.kind, "description": s.description,
                                              "status": "skipped", "reason": ps.skip_reason}
                continue
            current = s.name
            rss.mark(s.name)  # before the raw model loads: its memory must not count as the bundle's
            if s.kind == "overhead" and raw is None:
                from .overhead import RawLlama

                raw = RawLlama(pipeline.bundle.llm_path(), n_ctx, threads)
            if s.kind == "concurrency":
                from .concurrency import load_engine

                engine = load_engine(tgt.path, threads, decode_tokens, kv_type)  # closed after the scenario
            runs = []
            result: dict[str, Any] = {"kind": s.kind, "description": s.description, "status": "ok"}
            if s.kind == "audio":
                from .measure import profile_clip

                clip = clip or profile_clip()
                result["clip"] = {"source": clip.source, "description": clip.description,
                                  "seconds": clip.seconds, "typed": clip.text}
            try:
                for i in range(warmup + repeat):
                    progress.update(task, description=f"{entry['label']}: {s.name} "
                                    f"({'warm-up' if i < warmup else f'run {i - warmup + 1}/{repeat}'})")
                    other = engine if s.kind == "concurrency" else raw
                    run = (_run_once(s, pipeline, raw, decode_tokens, clip) if s.kind == "audio"
                           else _run_once(s, pipeline, other, decode_tokens))
                    if "context_mean" in run:  # one stream's run (the concurrency scenario has levels)
                        _add_roofline(run, tgt.shape, entry.get("bandwidth"))
                    if i >= warmup:
                        runs.append(run)
                    progress.advance(task)
            except Exception as exc:  # one broken scenario must not lose the others
                result.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            result["runs"] = runs
            result["summary"] = {k: summarize([r.get(k) for r in runs]) for k in SUMMARY_KEYS
                                 if any(r.get(k) is not None for r in runs)}
            if s.kind == "concurrency":
                from .concurrency import summarize_levels

                result["levels"] = summarize_levels(runs)
                result["threads"] = threads
                engine.close()
                engine = None
            entry["scenarios"][s.name] = result
            if s.kind == "audio":
                _audio_note(report, entry["label"], result)
            _snapshot(entry, rss, device)
            write_outputs(out, report, final=False)
        entry["status"] = "complete"
    except KeyboardInterrupt:
        entry["status"] = "interrupted"
        entry["interrupted_during"] = current
        raise
    finally:
        if device is not None:
            device.stop()
        rss.stop()
        _snapshot(entry, rss, device)
        if raw is not None:
            raw.close()
        if engine is not None:
            engine.close()
        if pipeline is not None:
            pipeline.close()
        close = getattr(device, "close", None)
        if close:
            close()


def _run_once(s: Scenario, pipeline: Any, raw: Any, decode_tokens: int, clip: Any = None) -> dict[str, Any]:
    from .measure import profile_image, prompt_ids, run_audio, run_chat, run_image, run_prompt
    from .overhead import run_overhead

    if s.kind == "chat":
        return run_chat(pipeline, CHAT_QUESTION, decode_tokens).to_dict()
    if s.kind == "image":
        return run_image(pipeline, IMAGE_QUESTION, decode_tokens, profile_image()).to_dict()
    if s.kind == "audio":
        return run_audio(pipeline, clip, decode_tokens)
    if s.kind == "prompt":
        return run_prompt(pipeline.llm, prompt_ids(pipeline.llm, s.prompt_tokens), decode_tokens).to_dict()
    if s.kind == "overhead":
        return run_overhead(pipeline.llm, raw, s.prompt_tokens, decode_tokens)
    if s.kind == "speculative":
        from .speculative import run_speculative

        return run_speculative(pipeline, decode_tokens)
    if s.kind == "concurrency":  # `raw` is the scenario's engine here
        from .concurrency import run_concurrency

        return run_concurrency(raw, decode_tokens)
    raise UserError(f"scenario {s.name} cannot run on this runtime")


def _audio_note(report: dict[str, Any], label: str, result: dict[str, Any]) -> None:
    """Say which clip the audio scenario heard, and its real-time factor, in the report's notes."""
    clip = result.get("clip") or {}
    summary = result.get("summary") or {}
    rtf = (summary.get("rtf") or {}).get("median")
    heard = next((r.get("heard") for r in result.get("runs", []) if r.get("heard") is not None), None)
    text = f"audio scenario ({label}): the clip is {clip.get('description', 'unknown')}"
    if heard is not None:
        text += f"; heard {' '.join(heard)!r}"
    if rtf is not None:
        text += (f"; real-time factor (transcribe_s / clip seconds) {rtf:.3f} median"
                 " (below 1 = faster than real time); ttft is from the clip to the first answer token")
    report["notes"].append(text)


def _add_roofline(run: dict[str, Any], shape: ModelShape, bandwidth: dict[str, Any] | None) -> None:
    tps = run.get("decode_tps")
    run["bytes_per_token"] = bytes_per_token(shape, run["context_mean"])
    if tps and bandwidth:
        run["roofline_ratio"] = roofline_ratio(tps, shape, run["context_mean"], bandwidth["gbs"])


def _snapshot(entry: dict[str, Any], rss: RssSampler, device: Any) -> None:
    mem = entry["memory"]
    # the concurrency and overhead scenarios add a second copy of the model
    peak = rss.peak_before(next((m for _, m in rss.marks if m in SECOND_COPY), "overhead"))
    mem["baseline_rss_bytes"] = rss.baseline_bytes
    mem["peak_rss_bytes"] = peak
    mem["peak_rss_over_baseline_bytes"] = peak - rss.baseline_bytes
    if any(m == "overhead" for _, m in rss.marks):
        mem["peak_rss_with_raw_llama_bytes"] = rss.peak_bytes
    mem["process_maxrss_bytes"] = process_maxrss_bytes()
    mem["loadavg"] = _loadavg()
    entry["timeline"] = {"rss": rss.timeline(), "marks": [[round(t, 4), m] for t, m in rss.marks]}
    if device is not None:
        entry["device"] = device.summary()
        entry["device_source"] = device.kind
        entry["device_error"] = device.error
        entry["timeline"]["device"] = device.timeline()


def _new_entry(tgt: _Target, label: str, threads: int, n_ctx: int, override: Any) -> dict[str, Any]:
    b = tgt.bundle
    manifest_target = b.manifest.target
    bandwidth = None
    if override is not None:
        bandwidth = {"target": override.name, "gbs": override.memory_bandwidth_gbs, "source": "--target"}
    elif is_jetson():
        from ..doctor import collect

        detected = collect().recommended_target
        t = get_target(detected)
        bandwidth = {"target": t.name, "gbs": t.memory_bandwidth_gbs, "source": "this Jetson's module"}
    elif manifest_target.memory_bandwidth_gbs:
        bandwidth = {"target": manifest_target.name, "gbs": manifest_target.memory_bandwidth_gbs,
                     "source": "bundle manifest"}
    return {
        "name": b.name,
        "label": label,
        "path": str(tgt.path),
        "backend": b.llm.backend,
        "quant": b.llm.quant,
        "file": b.llm.file,
        "file_bytes": tgt.shape.file_bytes,
        "tensor_types": b.llm.tensor_types,
        "encoders": sorted(b.manifest.encoders),
        "model": tgt.shape.to_dict(),
        "bandwidth": bandwidth,
        "threads": threads,
        "n_ctx": n_ctx,
        "status": "running",
        "memory": {},
        "scenarios": {},
    }


def _host() -> dict[str, Any]:
    import os
    import platform

    host: dict[str, Any] = {
        "system": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "loadavg_at_start": _loadavg(),
    }
    try:
        import psutil

        host["physical_cpus"] = psutil.cpu_count(logical=False)
        host["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        from ..doctor import collect

        d = collect()
        host.update(jetson=d.jetson, module=d.module, jetpack=d.jetpack, gpu=d.gpu, cuda=d.cuda,
                    llama_cpp=d.llama_cpp, llama_cpp_gpu_offload=d.llama_cpp_gpu_offload, nvml=d.nvml,
                    recommended_target=d.recommended_target)
    except Exception as exc:  # doctor never raises by design; a report without it is still a report
        host["doctor_error"] = f"{type(exc).__name__}: {exc}"
    return host


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: on a shared machine they say how much the numbers were contended."""
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
