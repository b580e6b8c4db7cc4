"""Tiny random LLaVA models for the vision export tests, built from configs: a CLIP tower
(LLaVA-1.5's layout) or a SigLIP tower, the llava-hf projector, a one-layer Llama.

Each folder holds what a real llava-hf checkpoint holds for the vision side:
config.json, model.safetensors and preprocessor_config.json (no tokenizer: the
vision export does not read one).
"""

from __future__ import annotations

from pathlib import Path

LLM_HIDDEN = 64


def build_tiny_llava_vision(
    out: Path,
    tower: str = "clip",
    image_size: int = 30,
    patch_size: int = 6,
    num_layers: int = 3,
    vision_feature_layer: int | list[int] = -2,
    select_strategy: str = "default",
    seed: int = 0,
) -> Path:
    """A LlavaForConditionalGeneration folder with a `tower` ("clip" | "siglip") vision tower."""
    import torch
    import transformers as T

    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": num_layers,
              "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size}
    if tower == "clip":
        vision_config = T.CLIPVisionConfig(**vision)
        processor = T.CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    elif tower == "siglip":
        vision_config = T.SiglipVisionConfig(**vision)
        processor = T.SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    else:
        raise ValueError(tower)
    config = T.LlavaConfig(
        vision_config=vision_config,
        text_config=T.LlamaConfig(vocab_size=128, hidden_size=LLM_HIDDEN, intermediate_size=128,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256),
        image_token_index=127, vision_feature_select_strategy=select_strategy,
        vision_feature_layer=vision_feature_layer, projector_hidden_act="gelu",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = T.LlavaForConditionalGeneration(config)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
