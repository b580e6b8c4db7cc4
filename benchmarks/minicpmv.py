"""MiniCPM-V 2.0 / 2.6 on this machine: slices per photo size, vision latency at the real shapes, image TTFT.

    python benchmarks/minicpmv.py slices                      # the slicing plans (instant)
    python benchmarks/minicpmv.py speed --threads 2           # random weights at the real shapes (minutes)

`slices` prints, for common photo sizes, OpenBMB's plan (overview + grid, the same in 2.0 and 2.6),
the rows the image takes in the prompt (64 per overview or slice) and llama.cpp mtmd's plan.

`speed` builds the published vision shapes with random weights (the speed does not depend on them):
2.0 timm SigLIP-so400m, 26 blocks, 1152 wide + resampler 2304 wide; 2.6 NaViT SigLIP, 27 layers +
resampler 3584 wide; 64 queries each. It exports each to ONNX (fp32), checks it against torch at one
slice and times ONNX Runtime (CPU) per 448 x 448 slice (32 x 32 patches), position tables included.
An image costs (1 + slices) of these (see `slices`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from timing import timed

PHOTOS = [(640, 480), (800, 600), (1024, 768), (1280, 720), (1920, 1080), (1080, 1920), (2048, 1536),
          (4032, 3024), (3024, 4032), (448, 448), (300, 200)]


def slices() -> None:
    from vishwamai_edge.runtime.minicpmv_slices import SliceConfig, n_query_rows, plan_slices, plan_slices_llamacpp

    config = SliceConfig("2.6")
    print(f"{'photo':>10} {'overview':>10} {'grid':>5} {'blocks':>6} {'rows':>5}   llama.cpp mtmd")
    for w, h in PHOTOS:
        p, q = plan_slices(w, h, config), plan_slices_llamacpp(w, h)
        grid = f"{p.grid[0]}x{p.grid[1]}" if p.grid else "-"
        theirs = "same" if p == q else f"overview {q.overview}, grid {q.grid}"
        print(f"{w:>5}x{h:<4} {p.overview[0]:>4}x{p.overview[1]:<5} {grid:>5} {1 + p.n_slices:>6} "
              f"{n_query_rows(p, config):>5}   {theirs}")


def random_state(variant: str, llm_hidden: int):
    import torch

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    import minicpmv_models

    tower = {"width": 1152, "layers": 26 if variant == "2.0" else 27, "mlp": 4304, "patch": 14,
             "side": 27 if variant == "2.0" else 70}
    minicpmv_models.TOWER.update(tower)
    minicpmv_models.RESAMPLER.update(embed_dim=llm_hidden, queries=64)
    minicpmv_models.VISION_CONFIG_2_6.update(hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                                             num_hidden_layers=27, image_size=980)
    with torch.no_grad():
        return minicpmv_models.random_vision_state(variant), minicpmv_models.vision_config(variant)


def speed(threads: int, runs: int) -> None:
    import numpy as np
    import torch

    from vishwamai_edge.export.minicpmv_vision import load_vision, position_table
    from vishwamai_edge.export.onnx.minicpmv import check_minicpmv_vision, export_minicpmv_vision
    from vishwamai_edge.runtime.minicpmv import MiniCPMVEncoder
    from vishwamai_edge.runtime.minicpmv_slices import SliceConfig

    torch.set_num_threads(threads)
    for variant, hidden in (("2.0", 2304), ("2.6", 3584)):
        with tempfile.TemporaryDirectory() as tmp:
            state, config = random_state(variant, hidden)
            module, layout = load_vision(state, config, Path(tmp))
            t = time.perf_counter()
            graph = export_minicpmv_vision(module, layout, Path(tmp) / "vision.onnx")
            export_s = time.perf_counter() - t
            diff = check_minicpmv_vision(module, layout, graph, [(32, 32)])
            encoder = MiniCPMVEncoder.load(graph, position_table(state, layout), SliceConfig(variant), hidden,
                                           providers=["CPUExecutionProvider"], threads=threads)
            del module, state
            slice_pixels = np.random.default_rng(0).integers(0, 256, size=(448, 448, 3), dtype=np.uint8)
            seconds = timed(lambda: encoder.encode_slice(slice_pixels), runs)
            print(f"MiniCPM-V {variant}: vision + resampler, one 448x448 slice (1024 patches -> 64 x {hidden}), "
                  f"ONNX Runtime CPU fp32, {threads} threads: median {statistics.median(seconds) * 1000:.0f} ms "
                  f"({runs} runs); export {export_s:.0f} s; max abs diff to torch {diff:.2g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["slices", "speed"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    slices() if args.what == "slices" else speed(args.threads, args.runs)


if __name__ == "__main__":
    main()
