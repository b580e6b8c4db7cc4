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


# -- llava-hf/llava-1.5-7b-hf, scaled down ---------------------------------------------------------
# Its config.json as the Hub ships it (transformers 4.36 wrote it): sparse text/vision configs on
# the Llama / CLIP defaults, with the sizes of the tiny model filled in by build_tiny_llava15_hf.
LLAVA15_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}
# Its preprocessor_config.json: CLIP's resize of the shortest edge to 336, centre crop 336, no padding.
LLAVA15_PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
LLAVA15_BASE_VOCAB = 32000  # Llama 2's SentencePiece; <image> 32000 and <pad> 32001 are added tokens


def _added(i: int, content: str) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def llava15_tokenizer(out: Path, work: Path) -> Path:
    """A Llama-2-style SentencePiece tokenizer laid out like llava-1.5-7b-hf's: 32000 pieces (a tiny
    trained BPE, the rest unused placeholders nothing ever produces), `<image>` 32000 and `<pad>`
    32001 as added tokens, in tokenizer.model, tokenizer.json and tokenizer_config.json alike.

    tokenizers ignores the ids written in tokenizer.json's added_tokens (it numbers them from the
    model's vocabulary size on), so the base vocabulary itself is padded to 32000, as Llama 2's is.
    """
    import json

    from sentencepiece import sentencepiece_model_pb2
    from tiny_models import train_sentencepiece_tokenizer

    src = train_sentencepiece_tokenizer(work)
    out.mkdir(parents=True, exist_ok=True)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((src / "tokenizer.model").read_bytes())
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    assert len(proto.pieces) == len(vocab)
    for i in range(len(proto.pieces), LLAVA15_BASE_VOCAB):
        text = chr(0xF0000 + i)  # a private-use character: never in any text
        piece = proto.pieces.add()
        piece.piece, piece.score = text, -1e4
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
        vocab[text] = i
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    tok["added_tokens"] += [_added(32000, "<image>"), _added(32001, "<pad>")]
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    decoder = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tok["added_tokens"]}
    # llava-1.5-7b-hf's tokenizer_config.json: legacy false (no word-start mark after `<image>` or `</s>`)
    config.update(added_tokens_decoder=decoder, pad_token="<pad>", padding_side="left", legacy=False,
                  processor_class="LlavaProcessor", chat_template=LLAVA15_TEMPLATE)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2))
    return out


def build_tiny_llava15_hf(out: Path, work: Path, image_size: int = 42, seed: int = 0) -> Path:
    """llava-hf/llava-1.5-7b-hf scaled down: the same config keys, tensor names (language_model.model.*,
    vision_tower.vision_model.*, multi_modal_projector.linear_{1,2}), fp16 shards + index, tokenizer,
    processor files and chat template; CLIP at patch 14, `image_size` (42: 9 patches), hidden 32."""
    import json

    import torch
    import transformers as T
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tok_dir = llava15_tokenizer(work / "tokenizer", work / "spm")
    tok = T.AutoTokenizer.from_pretrained(tok_dir)
    assert tok.convert_tokens_to_ids("<image>") == 32000 and tok.convert_tokens_to_ids("<pad>") == 32001
    hub = json.loads(json.dumps(LLAVA15_CONFIG))
    hub["text_config"].update(hidden_size=LLM_HIDDEN, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4)
    hub["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=2, image_size=image_size, projection_dim=32)
    (out / "config.json").write_text(json.dumps(hub, indent=2))
    config = T.AutoConfig.from_pretrained(out)
    torch.manual_seed(seed)
    model = T.LlavaForConditionalGeneration(config)
    with torch.no_grad():  # lively weights, as build_tiny_llava_chat
        for p in model.model.language_model.parameters():
            p.normal_(0, 0.2) if p.ndim > 1 else None
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0, 0.3)
        # the placeholder pieces, <image>, <pad> and the rows past them never win the argmax
        # (in the real model they are trained down; random rows would make every answer one of them)
        n_real = sum(1 for t in tok.convert_ids_to_tokens(range(LLAVA15_BASE_VOCAB)) if ord(t[-1]) < 0xF0000)
        model.lm_head.weight[n_real:] = 0
    # the Hub's names (transformers 4.x layout), in three fp16 shards like the real checkpoint
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        elif k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        elif k.startswith("model.vision_tower.vision_model."):
            k = k[len("model."):]
        elif k.startswith("model.vision_tower."):  # transformers 5 drops CLIPVisionModel's vision_model level
            k = "vision_tower.vision_model." + k[len("model.vision_tower."):]
        elif k.startswith("model."):
            k = k[len("model."):]  # multi_modal_projector.*
        state[k] = v.to(torch.float16).contiguous()
    keys = sorted(state)
    first = ("language_model.model.layers.0.", "language_model.model.embed")
    groups = [[k for k in keys if k.startswith(first)],
              [k for k in keys if k.startswith("language_model.") and not k.startswith(first)],
              [k for k in keys if not k.startswith("language_model.")]]
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k] for k in group}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    total = sum(v.numel() * 2 for v in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001,
         "transformers_version": "4.36.0.dev0"}, indent=2))
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((tok_dir / name).read_bytes())
    pre = json.loads(json.dumps(LLAVA15_PREPROCESSOR))
    pre.update(crop_size={"height": image_size, "width": image_size}, size={"shortest_edge": image_size})
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (out / "processor_config.json").write_text(json.dumps(
        {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14,
         "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"}, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA15_TEMPLATE}, indent=2))
    return out
