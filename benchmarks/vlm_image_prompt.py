"""Image-prompt latency of a vision-language bundle at LLaVA-1.5's vision shape, on this machine.

No LLaVA weights can be downloaded here, so the model is assembled: the embedded SmolLM2-135M
as the language model, a CLIP ViT-L/14-336 tower with random weights (LLaVA-1.5's, 576 image
tokens) and a random two-layer projector to SmolLM2's width. Answers are meaningless; the
timings are those of the real shapes. The bundle is built with `vishwamai-edge build` and
measured with `vishwamai-edge profile` (chat and image scenarios, side by side).

    python benchmarks/vlm_image_prompt.py [--out build/bench-vlm] [--threads 2] [--dtype fp16]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def assemble(out: Path) -> Path:
    """SmolLM2 + random CLIP-L/336 + projector as a llava-hf folder."""
    import torch
    import transformers as T

    from vishwamai_edge.sources.embedded import embedded_hf_dir

    llm_dir = embedded_hf_dir()
    text = T.AutoConfig.from_pretrained(llm_dir)
    tok = T.AutoTokenizer.from_pretrained(llm_dir)
    tok.add_tokens(["<image>"], special_tokens=True)
    config = T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                         num_attention_heads=16, image_size=336, patch_size=14,
                                         projection_dim=768),
        text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    config.text_config.vocab_size = len(tok)
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(0)
    model = T.LlavaForConditionalGeneration(config)
    lm = T.AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    lm.resize_token_embeddings(len(tok))
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    T.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(out)
    from vishwamai_edge.export.llava import read_config  # noqa: F401  (the folder must read back)

    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['content'] is string %}"
        "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}{{ '<image>' }}"
        "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(tok.chat_template)
    return out


def main() -> None:
    from rich.console import Console

    from vishwamai_edge.build import build
    from vishwamai_edge.profile import run_profile
    from vishwamai_edge.recipe import load_recipe
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.targets import get_target

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("build/bench-vlm"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "int8"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    console = Console(stderr=True)
    src = args.out / "llava-smollm2-clip336"
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        with console.status("assembling SmolLM2 + random CLIP-L/336"):
            assemble(src)
    recipe = args.out / "recipe.yaml"
    recipe.write_text(
        f"name: bench-vlm\nsource: {{kind: hf, path: {src.resolve()}}}\n"
        f"export:\n  vision: {{dtype: {args.dtype}, mmproj: false}}\n  verify: {{tolerance: 0.25}}\n"
        "runtime: {n_ctx: 2048}\n"
    )
    result = build(load_recipe(recipe), get_target("laptop-cpu"), args.out / "build", n_threads=args.threads,
                   console=console)
    report = run_profile([result.bundle], args.out / "profile", "chat,image", repeat=args.repeat, warmup=1, target=None, decode_tokens=32, console=console, options=RuntimeOptions(n_threads=args.threads, n_ctx=None))
    b = report.report["bundles"][0]
    rows = []
    for name in ("chat", "image"):
        s = b["scenarios"][name]["summary"]
        rows.append({k: s[k]["median"] for k in ("prompt_tokens", "encode_s", "prefill_s", "ttft_s", "decode_tps")
                     if k in s})
        print(name, json.dumps(rows[-1]))
    print("peak RSS MB", round(b["memory"]["peak_rss_bytes"] / 1e6))


if __name__ == "__main__":
    main()
