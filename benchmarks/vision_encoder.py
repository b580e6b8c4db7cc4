"""Vision encoder speed: ONNX Runtime fp32 / fp16 / int8 against torch eager, one image.

    python benchmarks/vision_encoder.py --threads 2 --runs 3

The shape is LLaVA-1.5's: CLIP ViT-L/14 at 336 px (24 layers, hidden 1024, features
from layer -2, CLS dropped: 576 tokens) and its projector 1024 -> 4096 -> 4096, with
random weights (speed does not depend on them; the check numbers printed do, a
little). Each graph is written by `export_vision`, so its check against torch runs
too. Reported: median and min seconds of --runs encodes of batch 1 after one
warm-up, the file size, and the export check's max relative diff and min cosine.
ONNX Runtime runs on the CPU provider; fp16 there is a correctness path, not a fast
one (its fp16 kernels are for GPUs and ARM).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from timing import timed


def vit_l_336_llava(layers: int):
    import torch
    import transformers as T
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    vision = T.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                                num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                hidden_act="quick_gelu")
    text = T.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                         num_attention_heads=32, vocab_size=32064)
    config = T.LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    # only the two modules the export reads: a 7B language model is not needed to time them
    tower = T.AutoModel.from_config(config.vision_config, dtype=torch.float32).eval()
    projector = LlavaMultiModalProjector(config)
    return SimpleNamespace(config=config, vision_tower=tower, multi_modal_projector=projector)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=24, help="fewer for a quick smoke run")
    ap.add_argument("--dtypes", default="fp32,fp16,int8")
    args = ap.parse_args()

    import numpy as np
    import torch

    from vishwamai_edge.errors import quiet_transformers
    from vishwamai_edge.export.onnx import export_vision
    from vishwamai_edge.export.onnx.base import family_for
    from vishwamai_edge.runtime.encoders import VisionEncoder

    quiet_transformers()
    torch.set_num_threads(args.threads)
    model = vit_l_336_llava(args.layers)
    x = np.random.default_rng(0).standard_normal((1, 3, 336, 336)).astype(np.float32)
    rows = []

    graph = family_for(model.config).graph(model.vision_tower, model.multi_modal_projector).eval()
    with torch.no_grad():
        times = timed(lambda: graph(torch.from_numpy(x)), args.runs)
    rows.append(("torch eager", "fp32", times, None, None))

    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            t0 = time.perf_counter()
            info = export_vision(model, Path(tmp) / f"vision-{dtype}.onnx", dtype, threads=args.threads)
            export_s = time.perf_counter() - t0
            encoder = VisionEncoder.load(info.path, providers=["CPUExecutionProvider"], threads=args.threads)
            times = timed(lambda enc=encoder: enc.encode(x), args.runs)
            size_mb = info.path.stat().st_size / 2**20
            rows.append((f"onnxruntime cpu (export {export_s:.0f} s)", dtype, times, size_mb, info.check))
            encoder.close()

    print(f"\nCLIP ViT-L/14-336 + LLaVA projector, {args.layers} layers, batch 1, {args.threads} threads, "
          f"median of {args.runs} runs after a warm-up; tokens 576 x 4096\n")
    header = f"{'engine':36s} {'dtype':5s} {'median s':>9s} {'min s':>7s} {'MB':>7s} {'max rel':>9s}"
    print(f"{header} {'min cos':>9s}")
    for name, dtype, times, size_mb, check in rows:
        size = f"{size_mb:7.0f}" if size_mb else f"{'-':>7s}"
        rel = f"{check['max_rel_diff']:9.2e}" if check else f"{'-':>9s}"
        cos = f"{check['min_cosine']:9.6f}" if check else f"{'-':>9s}"
        print(f"{name:36s} {dtype:5s} {statistics.median(times):9.2f} {min(times):7.2f} {size} {rel} {cos}")


if __name__ == "__main__":
    main()
