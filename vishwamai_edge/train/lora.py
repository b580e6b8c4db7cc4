"""The trainable model: the base loaded for a method (fp32/bf16, or NF4 for QLoRA), LoRA added.

LoRA runs anywhere. QLoRA (bitsandbytes NF4 with double quantisation, a paged 8-bit AdamW)
needs CUDA: bitsandbytes can run 4-bit on a CPU but at about 140 s a step on SmolLM2,
so asking for it there is refused with a pointer to LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RecipeError, UserError, peft_on_transformers, quiet_transformers, require
from ..recipe import FinetuneSpec
from .lora_targets import is_vision_language, projector_name, resolve_target_modules


class FinetuneError(UserError):
    """Fine-tuning cannot run as asked (method, hardware, checkpoint)."""


@dataclass
class Loaded:
    model: Any  # the peft model
    tokenizer: Any
    processor: Any  # vision-language models only, else None
    target_modules: list[str]
    dtype: Any


def training_dtype(spec: FinetuneSpec, device_type: str):
    torch = require("torch", "build")
    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU: bf16 matmuls are slower than fp32 on most CPUs, and less exact


def require_cuda_for_qlora(where: str) -> None:
    torch = require("torch", "build")
    if not torch.cuda.is_available():
        raise FinetuneError(
            f"{where}: finetune.method qlora needs a CUDA GPU (bitsandbytes NF4) and this machine has none; "
            "use LoRA instead: --method lora (or finetune.method: lora), which trains on the CPU"
        )


def qlora_quantization_config(compute_dtype):
    """NF4 weights, double quantisation (the quantisation constants quantised too), 16-bit compute."""
    transformers = quiet_transformers()
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def model_class(config):
    transformers = quiet_transformers()
    if is_vision_language(config):
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def load_for_training(hf_dir: Path, spec: FinetuneSpec, device, where: str) -> Loaded:
    """Base model on `device` (a torch.device), frozen, with LoRA adapters (with `full`: all of it trainable);
    tokenizer (and processor)."""
    torch = require("torch", "build")
    transformers = quiet_transformers()
    peft = require("peft", "train")

    config = transformers.AutoConfig.from_pretrained(hf_dir, trust_remote_code=False)
    dtype = training_dtype(spec, device.type)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec.method == "qlora":
        require_cuda_for_qlora(where)
        require_bitsandbytes()
        kwargs["quantization_config"] = qlora_quantization_config(dtype)
        kwargs["device_map"] = {"": device.index or 0}  # each process its own GPU (accelerate launch)
    model = model_class(config).from_pretrained(hf_dir, **kwargs)
    if spec.method != "qlora":
        model.to(device)
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}  # works with frozen inputs and with DDP
    if spec.method == "qlora":
        # layer norms to fp32, inputs requiring grads, base frozen: what 4-bit training needs
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif spec.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    processor = (transformers.AutoProcessor.from_pretrained(hf_dir, trust_remote_code=False)
                 if is_vision_language(config) else None)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.full:  # every weight trains, in the training dtype
        for p in model.parameters():
            p.requires_grad_(True)
        return Loaded(model, tokenizer, processor, [], dtype)

    targets = resolve_target_modules(model, spec.lora.target_modules, where)
    modules_to_save = None
    if spec.lora.train_projector:
        if not is_vision_language(config):
            raise RecipeError(f"{where}: finetune.lora.train_projector: the model has no vision projector")
        modules_to_save = [projector_name(model, where)]
    lora_config = peft.LoraConfig(
        r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
        target_modules=targets, modules_to_save=modules_to_save, bias="none", task_type="CAUSAL_LM",
    )
    with peft_on_transformers():
        model = peft.get_peft_model(model, lora_config)
    if dtype != torch.float32 and spec.method != "qlora":
        # adapters train in fp32 over a 16-bit base: small updates do not vanish in rounding
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return Loaded(model, tokenizer, processor, targets, dtype)


def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise FinetuneError(
            "QLoRA needs bitsandbytes, which is not installed (it is CUDA-only and not in any extra): "
            "pip install bitsandbytes"
        ) from None
    return bitsandbytes


def make_optimizer(spec: FinetuneSpec, params: list):
    """AdamW; for QLoRA bitsandbytes' paged 8-bit AdamW, whose states spill to CPU memory under pressure."""
    torch = require("torch", "build")
    if spec.method == "qlora":
        bnb = require_bitsandbytes()
        return bnb.optim.PagedAdamW8bit(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
