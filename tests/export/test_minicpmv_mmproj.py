"""MiniCPM-V 2.6 mmproj GGUF in stock llama.cpp's libmtmd (llama-cpp-python's vendored build).

A tiny random 2.6 folder with the published names and a 70 x 70 NaViT position table (image_size 980,
as published: clip.cpp buckets positions onto 70 x 70). A 448 x 448 image needs no slicing in either
rule (OpenBMB's overview is 448 x 448; llama.cpp's mtmd makes one 448 x 448 image of it), so both sides
see the same pixels; libmtmd's rows for it are compared with our torch reference of the tower + resampler.
Tolerance: max |diff| / max |torch| under 1e-2 (ggml's CPU gelu reads an fp16 table, as in
tests/export/test_mmproj.py).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from vishwamai_edge.export.gguf import convert_hf_to_gguf
from vishwamai_edge.export.gguf.minicpmv_mmproj import write_minicpmv_mmproj
from vishwamai_edge.export.minicpmv import read_minicpmv, write_llm_folder
from vishwamai_edge.export.minicpmv_vision import load_vision
from vishwamai_edge.export.torch_state import safetensors_state

REL_TOL = 1e-2


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer_dirs):
    import minicpmv_models

    out = tmp_path_factory.mktemp("minicpmv-2.6-side70")
    return minicpmv_models.build_tiny_minicpmv(out / "MiniCPM-V-2_6", "2.6", tokenizer_dirs["qwen2"], side=70)


def _mtmd_rows(llm_gguf, mmproj, image: np.ndarray) -> list[np.ndarray]:
    import llama_cpp
    from llama_cpp import mtmd_cpp as M

    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(llm_gguf).encode(), mp)
    assert model
    params = M.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 2, False, False
    mctx = M.mtmd_init_from_file(str(mmproj).encode(), model, params)
    assert mctx, "libmtmd refused the mmproj"
    try:
        data = (ctypes.c_uint8 * image.size).from_buffer_copy(np.ascontiguousarray(image).tobytes())
        bitmap = M.mtmd_bitmap_init(image.shape[1], image.shape[0], data)
        text = M.mtmd_input_text()
        raw = (M.mtmd_default_marker().decode() + "\nWhat is in the picture?").encode()
        text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), False, True
        chunks = M.mtmd_input_chunks_init()
        bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert M.mtmd_tokenize(mctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        M.mtmd_bitmap_free(bitmap)
        n_embd = llama_cpp.llama_model_n_embd(model)
        out = []
        for i in range(M.mtmd_input_chunks_size(chunks)):
            chunk = M.mtmd_input_chunks_get(chunks, i)
            if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                n = M.mtmd_input_chunk_get_n_tokens(chunk)
                assert M.mtmd_encode_chunk(mctx, chunk) == 0
                out.append(np.ctypeslib.as_array(M.mtmd_get_output_embd(mctx), shape=(n, n_embd)).copy())
        M.mtmd_input_chunks_free(chunks)
        return out
    finally:
        M.mtmd_free(mctx)
        llama_cpp.llama_model_free(model)


def test_stock_mtmd_runs_the_26_mmproj(folder, tmp_path):
    layout = read_minicpmv(folder)
    mmproj = write_minicpmv_mmproj(layout, tmp_path / "mmproj-f32.gguf", "f32")
    llm = tmp_path / "llm"
    llm.mkdir()
    write_llm_folder(layout, llm)
    gguf = convert_hf_to_gguf(llm, tmp_path / "llm.gguf", "f32").path
    image = np.random.default_rng(4).integers(0, 256, (448, 448, 3), dtype=np.uint8)
    state = safetensors_state(folder, "MiniCPM-V")
    vision, vlayout = load_vision(state, layout.config, folder)
    with torch.no_grad():
        x = torch.from_numpy(image.copy()).float().div(255).sub(0.5).div(0.5).permute(2, 0, 1)[None]
        want = vision(x)[0].numpy()
    blocks = _mtmd_rows(gguf, mmproj, image)
    assert len(blocks) == 1 and blocks[0].shape == want.shape == (vlayout.n_queries, vlayout.embed_dim)
    rel = float(np.abs(blocks[0] - want).max() / np.abs(want).max())
    print(f"libmtmd vs torch, one 448 x 448 image: max |diff| / max |torch| {rel:.3g}")
    assert rel < REL_TOL


def test_no_mmproj_for_20(tiny_minicpmv, tmp_path):
    from vishwamai_edge.errors import ExportError

    with pytest.raises(ExportError, match="2.5 and later"):
        write_minicpmv_mmproj(read_minicpmv(tiny_minicpmv("2.0")), tmp_path / "m.gguf")


def test_recipe_bundle_carries_the_mmproj_for_stock_mtmd(folder, tmp_path):
    """recipes/minicpm-v-2_6.yaml -> the bundle's llm/ has the GGUF and its mmproj; stock libmtmd on those two
    files gives the rows our runtime's ONNX encoder gives for the same 448 x 448 image."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "minicpm-v-2_6.yaml"
    proc = subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", "build", "--recipe", str(recipe), "--target",
                           "laptop-cpu", "--out", str(tmp_path), "--threads", "2", "--quant", "f32",
                           "--set", f"source.path={folder}", "--set", "export.gguf.outtype=f32",
                           "--set", "export.gguf.quants=[]"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (bundle,) = [p.parent for p in tmp_path.glob("*/*/manifest.json")]
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["mmproj"]["file"] == "llm/mmproj-f32.gguf"
    image = np.random.default_rng(6).integers(0, 256, (448, 448, 3), dtype=np.uint8)
    (rows,) = _mtmd_rows(bundle / m["llm"]["file"], bundle / m["mmproj"]["file"], image)
    pipeline = Pipeline.load(bundle, RuntimeOptions(n_threads=2))
    try:
        (ours,) = pipeline.encoders["image"].encode([image])
    finally:
        pipeline.close()
    rel = float(np.abs(rows - ours).max() / np.abs(ours).max())
    print(f"stock libmtmd vs the bundle's ONNX encoder: max |diff| / max |ours| {rel:.3g}")
    assert rel < REL_TOL
