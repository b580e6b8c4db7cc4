"""Runtime overhead: this runtime's decode loop against raw llama-cpp-python.

Same GGUF, same prompt tokens, same thread count and context, greedy, the same number of
generated tokens. The raw side is `llama_cpp.Llama.generate`, the library's own loop;
ours is `prefill` + `stream` of the llama.cpp backend. A ratio above 1 means this
runtime decodes faster than the raw binding, below 1 that it adds overhead.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

from ..errors import require
from ..runtime.backends import LLMBackend
from ..runtime.backends.llamacpp import model_params
from ..runtime.generation_stats import decode_tokens_per_s
from .measure import prompt_ids, run_prompt


class RawLlama:
    """llama_cpp.Llama on the same file, loaded once per bundle."""

    def __init__(self, path: Path, n_ctx: int, n_threads: int):
        llama_cpp = require("llama_cpp", "runtime")
        # the backend's own offload rule: every layer on a GPU build, none on a CPU build
        gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
        # Llama() takes its model parameters from llama_model_default_params(): lend it the
        # backend's (the same kernels on both sides, and no AMX crash on the VMs that have one)
        low = importlib.import_module("llama_cpp.llama_cpp")
        default = low.llama_model_default_params
        low.llama_model_default_params = lambda: model_params(llama_cpp)
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                n_batch=512, n_ubatch=512, n_gpu_layers=gpu_layers, verbose=False,
            )
        finally:
            low.llama_model_default_params = default

    def run(self, ids: list[int], n_decode: int) -> dict[str, float]:
        self.llm.reset()  # no prompt prefix reused from the previous run
        t0 = time.perf_counter()
        t_first = 0.0
        n = 0
        greedy = {"temp": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}
        t_last = 0.0
        for _ in self.llm.generate(ids, reset=True, **greedy):
            n += 1
            t_last = time.perf_counter()
            t_first = t_first or t_last
            if n == n_decode:
                break
        return {"ttft_s": t_first - t0, "decode_s": t_last - t_first, "decode_tokens": n,
                "decode_tps": decode_tokens_per_s(n, t_last - t_first)}

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close:
            close()


def run_overhead(ours: LLMBackend, raw: RawLlama, n_prompt: int, n_decode: int) -> dict[str, Any]:
    """One paired run: ours then raw, on identical token ids."""
    ids = prompt_ids(ours, n_prompt)
    mine = run_prompt(ours, ids, n_decode)
    theirs = raw.run(ids, n_decode)
    ours_tps = mine.decode_tps or 0.0
    return {
        **mine.to_dict(),
        "raw_ttft_s": theirs["ttft_s"],
        "raw_decode_s": theirs["decode_s"],
        "raw_decode_tps": theirs["decode_tps"],
        "overhead_ratio": ours_tps / theirs["decode_tps"] if theirs["decode_tps"] else None,
    }
