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


# llava-hf/llava-1.5-7b-hf's chat template: images first in each turn, then its text.
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tiny_llava_chat(
    out: Path,
    tokenizer_dir: Path,
    tower: str = "clip",
    image_size: int = 30,
    patch_size: int = 6,
    vision_feature_layer: int | list[int] = -2,
    select_strategy: str = "default",
    pad_to_square: bool = False,
    seed: int = 0,
) -> Path:
    """A LLaVA with a tokenizer (`<image>` added), llava-hf's chat template and its processor config:
    everything `build` needs from a folder a user downloads."""
    import json

    import torch
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens(["<image>"], special_tokens=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size}
    if tower == "clip":
        vision_config = T.CLIPVisionConfig(**vision)
        processor = T.CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    else:
        vision_config = T.SiglipVisionConfig(**vision)
        processor = T.SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    config = T.LlavaConfig(
        vision_config=vision_config,
        text_config=T.LlamaConfig(vocab_size=len(tok), hidden_size=LLM_HIDDEN, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, tie_word_embeddings=False),
        image_token_index=image_id, vision_feature_select_strategy=select_strategy,
        vision_feature_layer=vision_feature_layer, projector_hidden_act="gelu",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = T.LlavaForConditionalGeneration(config)
    with torch.no_grad():  # lively weights: random init at std 0.02 makes every answer alike
        for p in model.model.language_model.parameters():
            p.normal_(0, 0.2) if p.ndim > 1 else None
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    if pad_to_square:
        cfg = json.loads((out / "preprocessor_config.json").read_text())
        cfg.update(image_processor_type="LlavaImageProcessor", do_pad=True)
        (out / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))
    tok.chat_template = LLAVA15_TEMPLATE
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(LLAVA15_TEMPLATE)
    return out
