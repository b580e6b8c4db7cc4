"""A tiny random LLaVA (CLIP vision tower, Llama language model) with its processor, built from configs."""

from __future__ import annotations

from pathlib import Path

VLM_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}{{ '<image>' }}{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IMAGE_SIZE, PATCH = 32, 8


def build_tiny_llava(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.chat_template = VLM_TEMPLATE
    image_id = tok.convert_tokens_to_ids("<image>")
    config = T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH),
        text_config=T.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                  tie_word_embeddings=False),
        image_token_index=image_id, vision_feature_select_strategy="default", vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = T.LlavaForConditionalGeneration(config)
    model.save_pretrained(out, safe_serialization=True)
    processor = T.LlavaProcessor(
        image_processor=getattr(T, "CLIPImageProcessorPil", T.CLIPImageProcessor)(size={"shortest_edge": IMAGE_SIZE},
                                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1, chat_template=VLM_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out
