"""MiniCPM-V 2.0 / 2.6 on this machine: slices per photo size, vision latency at the real shapes, image TTFT.

    python benchmarks/minicpmv.py slices                      # the slicing plans (instant)
    python benchmarks/minicpmv.py plan                        # the memory planner on the Orin modules (instant)
    python benchmarks/minicpmv.py speed --threads 2           # random weights at the real shapes (minutes)
    python benchmarks/minicpmv.py ttft --threads 2            # recipe build + image-prompt TTFT, tiny LLM (minutes)

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
    from vishwamai_edge.runtime.minicpmv_slices import (
        SliceConfig,
        n_query_rows,
        plan_slices,
        plan_slices_llamacpp,
    )

    config = SliceConfig("2.6")
    print(f"{'photo':>10} {'overview':>10} {'grid':>5} {'blocks':>6} {'rows':>5}   llama.cpp mtmd")
    for w, h in PHOTOS:
        p, q = plan_slices(w, h, config), plan_slices_llamacpp(w, h)
        grid = f"{p.grid[0]}x{p.grid[1]}" if p.grid else "-"
        theirs = "same" if p == q else f"overview {q.overview}, grid {q.grid}"
        print(f"{w:>5}x{h:<4} {p.overview[0]:>4}x{p.overview[1]:<5} {grid:>5} {1 + p.n_slices:>6} "
              f"{n_query_rows(p, config):>5}   {theirs}")


# the published config.json keys the planner reads (openbmb/MiniCPM-V-2, openbmb/MiniCPM-V-2_6)
PUBLISHED = {
    "2.0": {"architectures": ["MiniCPMV"], "model_type": "minicpmv", "hidden_size": 2304, "intermediate_size": 5760,
            "num_hidden_layers": 40, "num_attention_heads": 36, "num_key_value_heads": 36, "vocab_size": 122753,
            "scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4, "tie_word_embeddings": False,
            "query_num": 64, "max_slice_nums": 9, "drop_vision_last_layer": True},
    "2.6": {"architectures": ["MiniCPMV"], "model_type": "minicpmv", "version": 2.6, "hidden_size": 3584,
            "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "vocab_size": 151666, "tie_word_embeddings": False, "query_num": 64, "slice_config": {"max_slice_nums": 9},
            "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                              "patch_size": 14, "image_size": 980}},
}
ORIN = ("orin-nano-8", "orin-nx-16", "orin-agx-32", "orin-agx-64")


def plan() -> None:
    """The recipes' bundles (Q4_K_M + the fp32 ONNX vision graph, their n_ctx) on each Orin module."""
    from vishwamai_edge.export.minicpmv import MiniCPMVLayout, model_size
    from vishwamai_edge.memory_plan import plan_memory
    from vishwamai_edge.recipe import load_recipe
    from vishwamai_edge.targets import get_target

    root = Path(__file__).resolve().parents[1] / "recipes"
    print("| model | module | n_ctx | weights GB | KV cache GB | encoder GB | runtime GB | total GB | available GB | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for version, recipe in (("2.0", "minicpm-v-2.yaml"), ("2.6", "minicpm-v-2_6.yaml")):
        r = load_recipe(root / recipe)
        size = model_size(MiniCPMVLayout(Path("x"), PUBLISHED[version], version, ()), r.name)
        for name in ORIN:
            p = plan_memory(size, get_target(name), "q4_k_m", r.runtime.n_ctx, "llamacpp", r.export.vision.dtype)
            verdict = "fits" if p.fits else "; ".join(["does not fit", *p.suggestions[:1]])
            print(f"| MiniCPM-V {version} | {name} | {r.runtime.n_ctx} | {p.weights_gb:.2f} | {p.kv_cache_gb:.2f} | "
                  f"{p.encoder_gb:.2f} | {p.overhead_gb:.2f} | {p.total_gb:.2f} | {p.available_gb:.2f} | {verdict} |")


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


def real_vision_folder(out: Path, variant: str = "2.0") -> Path:
    """A MiniCPM-V 2.0 folder: the published vision shapes (random weights), a 2-layer MiniCPM LLM of 2.0's
    width (2304) and a small SentencePiece tokenizer: the LLM's share of the prompt time is then small."""
    import json
    import shutil

    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    import minicpm_models
    import minicpmv_models
    import tiny_models

    tok = tiny_models.train_sentencepiece_tokenizer(out.parent / "spm")
    state, _ = random_state(variant, 2304)
    config = {**minicpm_models.TINY_MINICPM, **PUBLISHED["2.0"], "num_hidden_layers": 2,
              "vocab_size": tiny_models.vocab_size_of(tok)}
    config.update({k: v for k, v in minicpmv_models.MULTIMODAL_2_0.items() if k != "query_num"})
    config["architectures"] = ["MiniCPMV"]
    llm = {**config, "architectures": ["MiniCPMForCausalLM"]}
    state.update(minicpm_models.random_minicpm_state(llm, 0, prefix="llm."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    for f in tok.iterdir():
        if f.name != "tokenizer.json":
            shutil.copy2(f, out / f.name)
    return out


def ttft(threads: int, runs: int, out: Path) -> None:
    """recipes/minicpm-v-2.yaml (laptop-cpu, Q4_K_M) on real_vision_folder, then a text prompt and image
    prompts (one needing no slices, one with slices) through ChatSession: time to the first token."""
    import numpy as np
    from rich.console import Console

    from vishwamai_edge.build import build
    from vishwamai_edge.recipe import load_recipe
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline
    from vishwamai_edge.targets import get_target

    src = out / "MiniCPM-V-2-real-vision"
    if not (src / "model.safetensors").is_file():
        shutil_rm = __import__("shutil").rmtree
        shutil_rm(src, ignore_errors=True)
        real_vision_folder(src)
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "minicpm-v-2.yaml",
                         [f"source.path={src}", "export.gguf.imatrix=false"])
    t = time.perf_counter()
    result = build(recipe, get_target("laptop-cpu"), out / "build", n_threads=threads, console=Console(stderr=True))
    print(f"build (or resume) {time.perf_counter() - t:.0f} s -> {result.bundle}")
    pipeline = Pipeline.load(result.bundle, RuntimeOptions(n_threads=threads))
    rng = np.random.default_rng(0)
    try:
        for label, size in (("text only", None), ("448x448 photo (no slices)", (448, 448)),
                            ("1024x768 photo", (768, 1024))):
            ttfts, encodes, positions = [], [], 0
            for _ in range(runs):
                pipeline.forget_images()
                session = pipeline.session(max_tokens=1)
                images = [rng.integers(0, 256, (*size, 3), dtype=np.uint8)] if size else []
                "".join(session.ask("What is in the picture?", images=images))
                st = session.last_stats
                ttfts.append(st.ttft_s)
                encodes.append(st.encode_s)
                positions = st.prompt_tokens
            print(f"{label}: {positions} prompt positions, TTFT median {statistics.median(ttfts):.2f} s "
                  f"(encoder {statistics.median(encodes):.2f} s), {runs} runs, {threads} threads")
    finally:
        pipeline.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["slices", "plan", "speed", "ttft"])
    parser.add_argument("--out", type=Path, default=Path("build/bench-minicpmv"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.what == "slices":
        slices()
    elif args.what == "plan":
        plan()
    elif args.what == "ttft":
        ttft(args.threads, args.runs, args.out)
    else:
        speed(args.threads, args.runs)


if __name__ == "__main__":
    main()
