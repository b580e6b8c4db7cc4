"""Quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize)."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError, require
from ..fsutil import atomic_file

# llama_ftype values of llama.h
QUANT_FTYPES = {"q4_k_m": 15, "q5_k_m": 17, "q8_0": 7}


def quantize_gguf(
    src: Path, dst: Path, quant: str, n_threads: int = 0, imatrix: dict[str, np.ndarray] | None = None
) -> dict[str, int]:
    """Write `dst` as `quant` of `src`; returns the tensor types really produced.

    llama.cpp falls back to other types for rows that do not divide into its
    blocks (SmolLM2's width 576 is no multiple of 256), so the file is read back
    rather than assuming every matrix got the requested type.
    """
    if quant not in QUANT_FTYPES:
        raise ExportError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_FTYPES)}")
    llama_cpp = require("llama_cpp", "runtime")
    from ..runtime.backends.llamacpp import _quiet_logs

    _quiet_logs(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = n_threads
    keep_alive = _attach_imatrix(llama_cpp, params, imatrix) if imatrix else None
    with atomic_file(Path(dst)) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ExportError(f"llama.cpp could not quantize {src} to {quant} (code {rc})")
    del keep_alive
    return tensor_types(Path(dst))


def _attach_imatrix(llama_cpp, params, imatrix: dict[str, np.ndarray]):
    """Point params.imatrix at a NULL-terminated C array; return what must stay alive."""
    arrays = [np.ascontiguousarray(v, dtype=np.float32) for v in imatrix.values()]
    names = [k.encode() for k in imatrix]
    entries = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
    for i, (name, arr) in enumerate(zip(names, arrays)):
        entries[i].name = name
        entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = arr.size
    entries[len(arrays)].name = None
    params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    return entries, arrays, names


def tensor_types(path: Path) -> dict[str, int]:
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def round_trip_state(hf_dir: Path, work_dir: Path, quant: str, outtype: str = "f16", name: str | None = None,
                     tokenizer_pre: str | None = None) -> dict[str, Any]:
    """An HF folder's weights as llama.cpp runs its `quant` GGUF (converted at `outtype`, quantized without an
    imatrix, as the build will), dequantized back into a torch state dict. The files are made under
    `work_dir` and removed: the same input gives the same weights, so a resumed run makes them again."""
    import os
    import shutil

    from ..sources.gguf import dequantize_gguf
    from .gguf import convert_hf_to_gguf

    tmp = Path(work_dir) / f".quantized-llm.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        f16 = convert_hf_to_gguf(hf_dir, tmp / f"model-{outtype}.gguf", outtype, name=name,
                                 tokenizer_pre=tokenizer_pre).path
        quantize_gguf(f16, tmp / f"model-{quant}.gguf", quant)
        f16.unlink()
        return dequantize_gguf(tmp / f"model-{quant}.gguf")[0].state_dict()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
