"""EfficientNet-Lite0 + projector (what `align` ships): ONNX Runtime fp32 / fp16 / int8 against torch eager.

    python benchmarks/align_encoder.py --threads 2 --runs 20

The graph is the aligned model's image side: EfficientNet-Lite0 with its ImageNet weights up to
the 80-channel stage (14 x 14 x 80 at 224 px), pooled to 16 cells, a depth-2 projector to
SmolLM2-135M's width (576), projector weights random (speed does not depend on them). Each
ONNX file is written by `export_vision`, whose check against torch runs too. Reported: median
and min seconds of batch-1 encodes after one warm-up, file size, the check's max relative diff.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from timing import timed  # benchmarks/ is on sys.path when a script in it runs


def main() -> None:
    import numpy as np
    import torch
    import transformers

    from vishwamai_edge.export.onnx import export_vision
    from vishwamai_edge.runtime.encoders import VisionEncoder
    from vishwamai_edge.train.align import add_image_token
    from vishwamai_edge.train.encoders import EfficientNetLite0
    from vishwamai_edge.train.aligned_folder import load_aligned, write_aligned
    from vishwamai_edge.train.projector import make_projector

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="align-encoder-"))
    # an aligned folder around a 1-layer LLM of SmolLM2's width: only its image side is timed
    from vishwamai_edge.sources.embedded import embedded_hf_dir

    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded_hf_dir())
    config = transformers.LlamaConfig(hidden_size=576, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=9, num_key_value_heads=3, vocab_size=len(tokenizer))
    llm = transformers.LlamaForCausalLM(config)
    encoder = EfficientNetLite0.pretrained()
    torch.manual_seed(0)
    projector = make_projector(encoder.dim, 576, encoder.grid, 16)
    token = add_image_token(tokenizer, llm, "<image>")
    write_aligned(work / "aligned", encoder, projector, llm, tokenizer, token, {})
    aligned = load_aligned(work / "aligned")
    graph = aligned.vision_graph()
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    with torch.no_grad():
        t = timed(lambda: graph(torch.from_numpy(x)), args.runs)
    print(f"{'engine':<16}{'median s':>10}{'min s':>10}{'MB':>8}{'max rel diff':>14}")
    print(f"{'torch eager':<16}{statistics.median(t):>10.4f}{min(t):>10.4f}{'':>8}{'':>14}")
    for dtype in ("fp32", "fp16", "int8"):
        path = work / f"vision-{dtype}.onnx"
        info = export_vision(work / "aligned", path, dtype, threads=args.threads)
        enc = VisionEncoder.load(path, providers=["CPUExecutionProvider"], threads=args.threads)
        t = timed(lambda enc=enc: enc.encode(x), args.runs)
        print(f"{'ORT ' + dtype:<16}{statistics.median(t):>10.4f}{min(t):>10.4f}"
              f"{path.stat().st_size / 1e6:>8.2f}{info.check['max_rel_diff']:>14.2e}")


if __name__ == "__main__":
    main()
