"""VILA1.5-3B on this machine and on paper: the memory planner per Orin module, encoder latency at
VILA's real vision shape, and the image-prompt time to first token.

    python benchmarks/vila.py plan                      # the planner's verdicts (configs only, seconds)
    python benchmarks/vila.py speed --threads 2         # encoder + image prompt (random weights, minutes)

`plan` reads VILA1.5-3b's published sizes (LLM 2560 wide, 32 layers, vocab 32000; SigLIP-so400m at
384 px, 27 layers; mlp_downsample to 196 rows) and prints, for every Orin module, the memory plan
of the llama.cpp bundle (Q4_K_M + fp16 ONNX encoder) and of the TensorRT-LLM engine (AWQ INT4),
with the engine plan (batch, prompt table, KV-cache budget).

`speed` writes a VILA folder at the real vision shape with random weights (the speed does not
depend on them) and a 2-layer LLM of VILA's width, then times:
- the vision encoder, SigLIP at layer -2 + mlp_downsample (729 patches -> 196 x 2560), one image:
  torch eager fp32 against ONNX Runtime (CPU) fp32 / fp16 / int8, each export checked against torch;
- the image prompt through `recipes/vila1.5-3b.yaml` (laptop-cpu, Q4_K_M + fp32 encoder) with
  `vishwamai-edge profile`'s chat and image scenarios: time to first token with and without an image.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from timing import timed

LLM = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2560, "intermediate_size": 6912,
       "num_hidden_layers": 32, "num_attention_heads": 20, "num_key_value_heads": 20, "vocab_size": 32000,
       "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1,
       "eos_token_id": 2}
TOWER = {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model", "hidden_size": 1152,
         "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384,
         "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
PROJECTOR = {"architectures": ["MultimodalProjector"], "mm_projector_type": "mlp_downsample",
             "model_type": "v2l_projector"}
TOP = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "hidden_size": 2560, "mm_hidden_size": 1152,
       "image_aspect_ratio": "resize", "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch",
       "s2": False}
ORIN = ("orin-nano-8", "orin-nx-16", "orin-agx-32", "orin-agx-64")


def write_configs(out: Path, llm: dict) -> Path:
    for sub, cfg in (("llm", llm), ("vision_tower", TOWER), ("mm_projector", PROJECTOR)):
        (out / sub).mkdir(parents=True, exist_ok=True)
        (out / sub / "config.json").write_text(json.dumps(cfg, indent=2))
    config = {**TOP, "llm_cfg": {"_name_or_path": "./llm", **llm},
              "vision_tower_cfg": {"_name_or_path": "./vision_tower", **TOWER},
              "mm_projector_cfg": {"_name_or_path": "./mm_projector", **PROJECTOR}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def plan(n_ctx: int) -> None:
    from vishwamai_edge.export.engine_plan import plan_engine
    from vishwamai_edge.export.vila import model_size, read_vila
    from vishwamai_edge.memory_plan import plan_memory
    from vishwamai_edge.targets import get_target

    with tempfile.TemporaryDirectory() as tmp:
        size = model_size(read_vila(write_configs(Path(tmp), LLM)), "vila1.5-3b")
    print(f"VILA1.5-3b: {size.params / 1e9:.2f} B LLM parameters, vision {size.encoder_params / 1e6:.0f} M, "
          f"{size.image_tokens} rows per image, context {n_ctx}\n")
    print("| module | path | weights GB | KV cache GB | encoder GB | runtime GB | total GB | available GB | verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    engines = []
    for name in ORIN:
        target = get_target(name)
        for fmt, backend in (("q4_k_m", "llamacpp"), ("int4_awq", "trtllm")):
            p = plan_memory(size, target, fmt, n_ctx, backend, "fp16")
            path = "llama.cpp Q4_K_M + ONNX fp16" if backend == "llamacpp" else "TensorRT-LLM AWQ INT4 + ONNX fp16"
            print(f"| {name} | {path} | {p.weights_gb:.2f} | {p.kv_cache_gb:.2f} | {p.encoder_gb:.2f} | "
                  f"{p.overhead_gb:.2f} | {p.total_gb:.2f} | {p.available_gb:.2f} | "
                  f"{'fits' if p.fits else 'does not fit: ' + '; '.join(p.suggestions[:1])} |")
        engines.append((name, plan_engine(size, target, n_ctx, "int4_awq")))
    print("\n| module | max_batch_size | prompt table rows | KV budget GB | KV tokens | free after engine GB |")
    print("|---|---|---|---|---|---|")
    for name, e in engines:
        print(f"| {name} | {e.max_batch_size} | {e.max_prompt_embedding_table_size} | {e.kv_cache_budget_gb:.2f} | "
              f"{e.kv_cache_tokens} | {e.free_after_engine_gb:.2f} |")


def real_shape_folder(out: Path) -> Path:
    """Random SigLIP-so400m/384 + mlp_downsample + a 2-layer LLM of VILA's width (SmolLM2's tokenizer)."""
    import torch
    import transformers as T
    from safetensors.torch import save_file

    from vishwamai_edge.sources.embedded import embedded_hf_dir

    tok_src = embedded_hf_dir()
    tok = T.AutoTokenizer.from_pretrained(tok_src)
    llm = {**LLM, "num_hidden_layers": 2, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
           "eos_token_id": tok.eos_token_id}
    write_configs(out, llm)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**{k: v for k, v in llm.items() if k != "architectures"}))
    model.to(torch.float16).save_pretrained(out / "llm")
    tok.save_pretrained(out / "llm")
    tower = T.SiglipVisionModel(T.SiglipVisionConfig(**{k: v for k, v in TOWER.items() if k != "architectures"}))
    save_file({f"vision_model.{k}".replace("vision_model.vision_model.", "vision_model."): v.half().contiguous()
               for k, v in tower.state_dict().items()}, str(out / "vision_tower" / "model.safetensors"))
    d, h = 4 * TOWER["hidden_size"], LLM["hidden_size"]
    g = torch.Generator().manual_seed(1)
    save_file({"layers.1.weight": torch.ones(d), "layers.1.bias": torch.zeros(d),
               "layers.2.weight": 0.02 * torch.randn(h, d, generator=g), "layers.2.bias": torch.zeros(h),
               "layers.4.weight": 0.02 * torch.randn(h, h, generator=g), "layers.4.bias": torch.zeros(h)},
              str(out / "mm_projector" / "model.safetensors"))
    return out




def speed(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from rich.console import Console

    from vishwamai_edge.build import build
    from vishwamai_edge.export.onnx import export_vision
    from vishwamai_edge.export.vila import load_vila_vision
    from vishwamai_edge.profile import run_profile
    from vishwamai_edge.recipe import load_recipe
    from vishwamai_edge.runtime.encoders import VisionEncoder
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.targets import get_target

    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    src = args.out / "VILA-real-vision-shape"
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        with console.status("writing a random VILA folder at the real vision shape"):
            real_shape_folder(src)
    x = np.random.default_rng(0).standard_normal((1, 3, 384, 384)).astype(np.float32)
    vision = load_vila_vision(src)
    with torch.no_grad():
        rows = [("torch eager", "fp32", timed(lambda: vision.module(torch.from_numpy(x)), args.runs), None, None)]
    for dtype in filter(None, args.dtypes.split(",")):
        path = args.out / f"vision-{dtype}.onnx"
        t0 = time.perf_counter()
        info = export_vision(src, path, dtype, threads=args.threads)
        export_s = time.perf_counter() - t0
        encoder = VisionEncoder.load(path, providers=["CPUExecutionProvider"], threads=args.threads)
        rows.append((f"onnxruntime cpu (export {export_s:.0f} s)", dtype,
                     timed(lambda enc=encoder: enc.encode(x), args.runs), path.stat().st_size / 2**20, info.check))
        encoder.close()
    print(f"\nVILA1.5 vision (SigLIP-so400m/384 at layer -2 + mlp_downsample, 196 x 2560), batch 1, "
          f"{args.threads} threads, median of {args.runs} after a warm-up\n")
    print("| engine | dtype | median s | min s | MB | max rel diff | min cosine |\n|---|---|---|---|---|---|---|")
    for name, dtype, times, mb, check in rows:
        size = f"{mb:.0f}" if mb else "-"
        rel = f"{check['max_rel_diff']:.2e}" if check else "-"
        cos = f"{check['min_cosine']:.6f}" if check else "-"
        print(f"| {name} | {dtype} | {statistics.median(times):.2f} | {min(times):.2f} | {size} | {rel} | {cos} |")

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "vila1.5-3b.yaml",
                         [f"source.path={src.resolve()}", "export.vision.dtype=fp32", "export.verify.tolerance=1.0",
                          # random weights: near-flat logits, so top-1 agreement means nothing here
                          "export.verify.min_top1_agreement=0", "export.verify.quant_min_top1_agreement=0",
                          "runtime.n_ctx=1024"])
    result = build(recipe, get_target("laptop-cpu"), args.out / "build", n_threads=args.threads, console=console)
    report = run_profile([result.bundle], args.out / "profile", "chat,image", repeat=args.runs, warmup=1, target=None, decode_tokens=16, console=console, options=RuntimeOptions(n_threads=args.threads, n_ctx=None))
    b = report.report["bundles"][0]
    print("\n| scenario | prompt tokens | encode s | prefill s | TTFT s |\n|---|---|---|---|---|")
    for name in ("chat", "image"):
        s = b["scenarios"][name]["summary"]
        get = lambda k: s[k]["median"] if k in s else 0.0  # noqa: E731
        print(f"| {name} | {get('prompt_tokens'):.0f} | {get('encode_s'):.2f} | {get('prefill_s'):.2f} | "
              f"{get('ttft_s'):.2f} |")
    print("peak RSS MB", round(b["memory"]["peak_rss_bytes"] / 1e6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("plan")
    p.add_argument("--n-ctx", type=int, default=4096)
    s = sub.add_parser("speed")
    s.add_argument("--out", type=Path, default=Path("build/bench-vila"))
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--dtypes", default="fp32,fp16,int8")
    args = ap.parse_args()
    if args.what == "plan":
        plan(args.n_ctx)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        speed(args)


if __name__ == "__main__":
    main()
