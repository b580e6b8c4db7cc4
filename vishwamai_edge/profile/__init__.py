"""`vishwamai-edge profile`: latency and memory of bundles, as report.json / report.md / plots / HTML.

    scenarios.py   the fixed scenario set (chat, 512/1024/2048-token prompts, encoders, overhead)
    measure.py     one timed run (prefill, TTFT, decode) on a loaded pipeline
    overhead.py    the same run on raw llama-cpp-python, for the runtime-overhead ratio
    monitors.py    RSS over time; NVML (nvml.py) or tegrastats / jtop (tegrastats.py) readings
    gguf_meta.py   model shape from the GGUF header; roofline.py the bandwidth ratio
    runner.py      bundles x scenarios, writing the report after every scenario
    report.py      the JSON schema, tables, Markdown; plots.py PNGs; html.py one self-contained page
"""

from __future__ import annotations

from .runner import ProfileResult, run_profile

__all__ = ["ProfileResult", "run_profile"]
