"""Which layers get LoRA adapters, per architecture; what a vision-language model keeps frozen.

The default is every linear layer of the language model's blocks (attention and MLP):
on small models that teaches a new fact far better than attention alone. lm_head and the
embeddings are left alone (tied on many small models, and huge). A recipe may name its
own layers (`finetune.lora.target_modules`); each must exist in the model.
"""

from __future__ import annotations

from ..errors import RecipeError

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# model_type (the language model's, for vision-language models) -> layer names
TARGET_MODULES: dict[str, list[str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],  # experts stay frozen: 8x the adapters otherwise
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}

# Module names of the vision-to-language projector in vision-language models.
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector")
_EXCLUDED = ("lm_head", "embed_tokens", "wte", "embed_out", "output")


def is_vision_language(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def language_model_type(config) -> str:
    text = getattr(config, "text_config", None) if is_vision_language(config) else None
    return (text or config).model_type


def _is_adaptable(module) -> bool:
    import torch

    # transformers' Conv1D (GPT-2) is a linear layer with transposed weights; peft handles both
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


def language_linear_layers(model) -> dict[str, str]:
    """Full module name -> leaf name of every adaptable layer in the language model."""
    vl = is_vision_language(model.config)
    out = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not _is_adaptable(module) or leaf in _EXCLUDED:
            continue
        if vl and "language_model" not in name.split("."):
            continue  # vision tower and projector: not adapted
        out[name] = leaf
    return out


def resolve_target_modules(model, requested: list[str] | None, where: str) -> list[str]:
    """The full names of the layers to adapt; `where` names the recipe for errors."""
    layers = language_linear_layers(model)
    available = sorted(set(layers.values()))
    if requested is None:
        wanted = TARGET_MODULES.get(language_model_type(model.config))
        wanted = [w for w in wanted if w in available] if wanted else available
        if not wanted:
            raise RecipeError(f"{where}: finetune.lora.target_modules: the model has no linear layers to adapt")
    else:
        if not requested:
            raise RecipeError(f"{where}: finetune.lora.target_modules: the list is empty")
        for i, name in enumerate(requested):
            if name not in available:
                raise RecipeError(
                    f"{where}: finetune.lora.target_modules.{i}: this {language_model_type(model.config)} model "
                    f"has no layer {name!r} (it has: {', '.join(available)})"
                )
        wanted = requested
    return [full for full, leaf in layers.items() if leaf in wanted]


def projector_name(model, where: str) -> str:
    """The projector's module name (for peft's modules_to_save)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for candidate in PROJECTOR_NAMES:
        if candidate in names:
            return candidate
    raise RecipeError(f"{where}: finetune.lora.train_projector: this model has no projector "
                      f"({' / '.join(PROJECTOR_NAMES)})")
