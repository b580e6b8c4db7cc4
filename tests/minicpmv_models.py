"""Tiny random MiniCPM-V vision sides (tower + resampler) with the published tensor names.

2.0 (openbmb/MiniCPM-V-2): timm names `vpm.patch_embed.proj`, `vpm.pos_embed` (1, side^2, C),
`vpm.blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `vpm.norm`; 2.6
(openbmb/MiniCPM-V-2_6): HF SigLIP names under `vpm.` (`embeddings.patch_embedding`,
`embeddings.position_embedding`, `encoder.layers.N.{self_attn.q_proj,...,layer_norm1,mlp.fc1}`,
`post_layernorm`) with `vision_config` in config.json; both: `resampler.{query, kv_proj, attn.*,
ln_q, ln_kv, ln_post, proj}` and, in 2.0 only, `resampler.pos_embed`.
Tiny sizes: tower 144 wide (2.0: 16 heads of 9, so400m's head count, which the exporter takes from
config.json's `vision_encoder` as timm does, not from the width; 2.6: 2 heads of 72 from its vision_config),
3 layers, patch 14, a 4 x 4 position table (56 px); resampler 256 wide (2 heads of 128), 8 queries.
"""

from __future__ import annotations

TOWER = dict(width=144, layers=3, mlp=192, patch=14, side=4)
SO400M = "vit_so400m_patch14_siglip_384.webli"  # MiniCPM-V 2.0's config.json `vision_encoder`
SO400M_HEADS = 16  # timm's vit_so400m_patch14_siglip_384
RESAMPLER = dict(embed_dim=256, queries=8)
VISION_CONFIG_2_6 = {"hidden_size": 144, "image_size": 56, "intermediate_size": 192, "model_type": "siglip",
                     "num_attention_heads": 2, "num_hidden_layers": 3, "patch_size": 14}


def random_vision_state(variant: str, seed: int = 0, side: int | None = None) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    def norm(prefix):
        return {f"{prefix}.weight": 1 + rand(C), f"{prefix}.bias": rand(C, std=0.1)}

    C, M, P, S = TOWER["width"], TOWER["mlp"], TOWER["patch"], side or TOWER["side"]
    D, Q = RESAMPLER["embed_dim"], RESAMPLER["queries"]
    state = {}
    if variant == "2.0":
        state.update({"vpm.patch_embed.proj.weight": rand(C, 3, P, P, std=0.05), "vpm.patch_embed.proj.bias": rand(C),
                      "vpm.pos_embed": rand(1, S * S, C)})
        for i in range(TOWER["layers"]):
            b = f"vpm.blocks.{i}"
            state.update({**norm(f"{b}.norm1"), **norm(f"{b}.norm2"),
                          f"{b}.attn.qkv.weight": rand(3 * C, C, std=0.08), f"{b}.attn.qkv.bias": rand(3 * C),
                          f"{b}.attn.proj.weight": rand(C, C, std=0.08), f"{b}.attn.proj.bias": rand(C),
                          f"{b}.mlp.fc1.weight": rand(M, C, std=0.08), f"{b}.mlp.fc1.bias": rand(M),
                          f"{b}.mlp.fc2.weight": rand(C, M, std=0.08), f"{b}.mlp.fc2.bias": rand(C)})
        state.update(norm("vpm.norm"))
    else:
        state.update({"vpm.embeddings.patch_embedding.weight": rand(C, 3, P, P, std=0.05),
                      "vpm.embeddings.patch_embedding.bias": rand(C),
                      "vpm.embeddings.position_embedding.weight": rand(S * S, C)})
        for i in range(TOWER["layers"]):
            b = f"vpm.encoder.layers.{i}"
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                state.update({f"{b}.self_attn.{name}.weight": rand(C, C, std=0.08), f"{b}.self_attn.{name}.bias": rand(C)})
            state.update({**norm(f"{b}.layer_norm1"), **norm(f"{b}.layer_norm2"),
                          f"{b}.mlp.fc1.weight": rand(M, C, std=0.08), f"{b}.mlp.fc1.bias": rand(M),
                          f"{b}.mlp.fc2.weight": rand(C, M, std=0.08), f"{b}.mlp.fc2.bias": rand(C)})
        state.update(norm("vpm.post_layernorm"))
    C = D  # the resampler's norms are D wide
    state.update({"resampler.query": rand(Q, D, std=0.5), "resampler.kv_proj.weight": rand(D, TOWER["width"], std=0.08),
                  "resampler.attn.in_proj_weight": rand(3 * D, D, std=0.06), "resampler.attn.in_proj_bias": rand(3 * D),
                  "resampler.attn.out_proj.weight": rand(D, D, std=0.06), "resampler.attn.out_proj.bias": rand(D),
                  **norm("resampler.ln_q"), **norm("resampler.ln_kv"), **norm("resampler.ln_post"),
                  "resampler.proj": rand(D, D, std=D ** -0.5)})
    if variant == "2.0":
        state["resampler.pos_embed"] = rand(Q, D, std=0.5)
    return {k: v.contiguous() for k, v in state.items()}


def vision_config(variant: str, side: int | None = None) -> dict:
    if variant != "2.6":
        return {"vision_encoder": SO400M}
    return {"vision_config": {**VISION_CONFIG_2_6, "image_size": (side or TOWER["side"]) * TOWER["patch"]}}


# the multimodal keys as the published config.json files carry them
MULTIMODAL_2_0 = {"architectures": ["MiniCPMV"], "model_type": "minicpmv", "query_num": RESAMPLER["queries"],
                  "image_size": 448, "patch_size": 14, "drop_vision_last_layer": True,
                  "vision_encoder": SO400M, "slice_mode": True, "max_slice_nums": 9,
                  "scale_resolution": 448, "mm_use_im_start_end": True}
MULTIMODAL_2_6 = {"architectures": ["MiniCPMV"], "model_type": "minicpmv", "version": 2.6,
                  "query_num": RESAMPLER["queries"], "image_size": 448, "patch_size": 14,
                  "drop_vision_last_layer": False, "batch_vision_input": True, "slice_mode": True,
                  "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"},
                  "use_image_id": True, "vision_config": VISION_CONFIG_2_6}
# openbmb/MiniCPM-V-2 tokenizer_config.json (revision b996e5b), the keys that do not name token ids: its
# tokenizer is modeling_minicpmv.py's LlamaTokenizerWrapper (a slow LlamaTokenizer), reached by `auto_map`
TOKENIZER_CONFIG_2_0 = {
    "add_bos_token": True, "add_eos_token": False,
    "auto_map": {"AutoTokenizer": ["modeling_minicpmv.LlamaTokenizerWrapper", None]},
    "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": True,
    "model_max_length": 1000000000000000019884624838656, "pad_token": "<unk>", "padding_side": "right",
    "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizerWrapper",
    "truncation_side": "right", "unk_token": "<unk>", "use_default_system_prompt": False,
}
# openbmb/MiniCPM-V-2_6 preprocessor_config.json's slicing and marker keys (MiniCPMVImageProcessor)
PREPROCESSOR_2_6 = {"image_processor_type": "MiniCPMVImageProcessor", "auto_map": {
                        "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
                        "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"},
                    "processor_class": "MiniCPMVProcessor", "max_slice_nums": 9, "scale_resolution": 448,
                    "patch_size": 14, "use_image_id": True, "image_feature_size": RESAMPLER["queries"],
                    "im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>",
                    "unk": "<unk>", "im_id_start": "<image_id>", "im_id_end": "</image_id>", "slice_mode": True,
                    "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5], "version": 2.6}


def build_tiny_minicpmv(out, variant: str, tokenizer_dir, seed: int = 0, side: int | None = None):
    """A MiniCPM-V folder of `variant` ("2.0": a MiniCPM LLM, "2.6": a Qwen2 LLM), 256 wide, one safetensors in
    bfloat16 as published, with the published file set: 2.0 has tokenizer.model and tokenizer.json (added for
    llama.cpp in 2024-04) and no chat template."""
    import torch

    import json
    import shutil

    import minicpm_models
    import tiny_models
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    llm = dict(hidden_size=RESAMPLER["embed_dim"], intermediate_size=384, num_attention_heads=4, num_key_value_heads=4)
    if variant == "2.0":
        config = {**minicpm_models.TINY_MINICPM, **llm, "vocab_size": tiny_models.vocab_size_of(tokenizer_dir)}
        state = minicpm_models.random_minicpm_state(config, seed, prefix="llm.")
        config.update(MULTIMODAL_2_0)
        skip = {"chat_template.jinja"}  # none published: the chat format is chat()'s code
    else:
        qwen = tiny_models.build_tiny_model(out / "qwen2", "qwen2", tokenizer_dir, seed, **{**llm, "num_key_value_heads": 2})
        config = {**json.loads((qwen / "config.json").read_text()), **MULTIMODAL_2_6, **vision_config(variant, side)}
        state = {"llm." + k: v for k, v in load_file(str(qwen / "model.safetensors")).items()}
        shutil.rmtree(qwen)
        skip = set()
    state.update(random_vision_state(variant, seed, side))
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if variant == "2.6":
        (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_2_6, indent=2))
    save_file(state, str(out / "model.safetensors"))
    for f in tokenizer_dir.iterdir():
        if f.name not in skip:
            shutil.copy2(f, out / f.name)
    if variant == "2.0":  # the published tokenizer_config.json's keys: OpenBMB's class, by remote code
        path = out / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **TOKENIZER_CONFIG_2_0}, indent=2))
    return out
