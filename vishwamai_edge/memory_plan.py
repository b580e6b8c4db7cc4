"""Will a build fit its target? Weights + KV cache + encoders + runtime overhead against the
target's memory, computed from the model's config before any work starts.

The numbers are estimates with stated rules, not measurements:
- weights: the decoder body, the token embeddings and the output head, each at the bits per
  weight its format stores. Q4_K_M mixes Q4_K and Q6_K blocks over the body (4.85 bits on
  average for Llama-family 7-8B models: llama.cpp's own Q4_K_M files of Llama-2-7B and
  Llama-3-8B are 4.08 and 4.92 GB), keeps the embeddings at Q4_K (4.5) and the head at Q6_K
  (6.5625). AWQ INT4 (group 128) stores 4 bits plus an fp16 scale and a 4-bit zero per group
  and keeps embeddings and head in fp16, as AWQ checkpoints do.
- KV cache: 2 x layers x KV heads x head size x context positions x bytes per element of the
  recipe's runtime.kv_type (2 for f16, 34/32 for q8_0, 18/32 for q4_0: runtime/kv_cache.py).
- encoders: fp16 (or the exported dtype) weights; the image rows' activations are small.
- runtime overhead: llama.cpp's compute buffers and the process (0.5 GB); TensorRT-LLM's
  runtime, engine workspace and CUDA context (1.0 GB); ONNX Runtime per encoder (0.3 GB).
- what the target keeps for itself: on a Jetson the OS and its services hold 1.5 GB of the
  shared CPU/GPU memory (a headless L4T image; a desktop session takes more); on a PC 25%.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .targets import TargetProfile

GB = 1e9
BODY_BITS = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q5_k_m": 5.69, "q4_k_m": 4.85,
             "int4_awq": 4 + (16 + 4) / 128, "fp16": 16.0}
EMBED_BITS = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q5_k_m": 5.5, "q4_k_m": 4.5,
              "int4_awq": 16.0, "fp16": 16.0}
HEAD_BITS = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q5_k_m": 6.5625, "q4_k_m": 6.5625,
             "int4_awq": 16.0, "fp16": 16.0}
ENCODER_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
RUNTIME_OVERHEAD_GB = {"llamacpp": 0.5, "trtllm": 1.0}
ENCODER_OVERHEAD_GB = 0.3
JETSON_RESERVED_GB = 1.5
PC_RESERVED_FRACTION = 0.25
FALLBACK_FORMATS = ("int4_awq", "q4_k_m")
FALLBACK_CONTEXTS = (4096, 2048, 1024)


@dataclass(frozen=True)
class ModelSize:
    """What memory depends on, read from a model's config."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    encoder_params: float = 0.0  # vision (or audio) tower + projector
    image_tokens: int = 0  # encoder rows per image

    @property
    def embed_params(self) -> float:
        return float(self.vocab * self.hidden)

    @property
    def body_params(self) -> float:
        attn = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        mlp = 3 * self.hidden * self.intermediate
        return float(self.layers * (attn + mlp + 2 * self.hidden) + self.hidden)

    @property
    def params(self) -> float:
        return self.body_params + self.embed_params * (1 if self.tied else 2)

    def weight_bytes(self, fmt: str) -> float:
        if fmt not in BODY_BITS:
            raise UserError(f"unknown weight format {fmt!r}; known: {', '.join(BODY_BITS)}")
        head = 0.0 if self.tied else self.embed_params * HEAD_BITS[fmt]
        return (self.body_params * BODY_BITS[fmt] + self.embed_params * EMBED_BITS[fmt] + head) / 8

    def kv_bytes(self, n_ctx: int, bytes_per_element: float = 2.0) -> float:
        return 2.0 * self.layers * self.kv_heads * self.head_dim * n_ctx * bytes_per_element


def model_size(config: dict[str, Any], name: str = "model") -> ModelSize:
    """From an HF config.json (a plain LM, or a LLaVA-style one with text_config / vision_config)."""
    text = config.get("text_config") or config.get("llm_cfg") or config
    try:
        hidden, layers = int(text["hidden_size"]), int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        size = ModelSize(
            name=name, layers=layers, hidden=hidden, intermediate=int(text["intermediate_size"]), heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads), vocab=int(text["vocab_size"]),
            tied=bool(text.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{name}: config.json lacks a size field for the memory plan ({exc})") from None
    vision = config.get("vision_config") or config.get("vision_tower_cfg")
    if isinstance(vision, dict) and "hidden_size" in vision:
        v_hidden, v_layers = int(vision["hidden_size"]), int(vision["num_hidden_layers"])
        v_inter = int(vision.get("intermediate_size", 4 * v_hidden))
        patch, image = int(vision.get("patch_size", 14)), int(vision.get("image_size", 336))
        tower = v_layers * (4 * v_hidden * v_hidden + 2 * v_hidden * v_inter) + 3 * patch * patch * v_hidden
        projector = v_hidden * hidden + hidden * hidden
        select = config.get("vision_feature_select_strategy", "default")
        tokens = (image // patch) ** 2 + (0 if select == "default" else 1) * (vision.get("model_type") == "clip_vision_model")
        size = ModelSize(**{**size.__dict__, "encoder_params": float(tower + projector), "image_tokens": tokens})
    return size


@dataclass
class MemoryPlan:
    model: str
    target: str
    fmt: str
    backend: str
    n_ctx: int
    weights_gb: float
    kv_cache_gb: float
    encoder_gb: float
    overhead_gb: float
    available_gb: float
    suggestions: list[str] = field(default_factory=list)

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.kv_cache_gb + self.encoder_gb + self.overhead_gb

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.available_gb

    def to_dict(self) -> dict[str, Any]:
        return {**{k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()},
                "total_gb": round(self.total_gb, 3), "fits": self.fits}

    def line(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit"
        return (f"{self.model} {self.fmt} on {self.target}: weights {self.weights_gb:.2f} + KV cache "
                f"{self.kv_cache_gb:.2f} ({self.n_ctx} tokens) + encoders {self.encoder_gb:.2f} + runtime "
                f"{self.overhead_gb:.2f} = {self.total_gb:.2f} GB of {self.available_gb:.2f} GB available: {verdict}")


def available_gb(target: TargetProfile) -> float:
    if target.jetson:
        return target.memory_gb - JETSON_RESERVED_GB
    return target.memory_gb * (1 - PC_RESERVED_FRACTION)


def plan_memory(size: ModelSize, target: TargetProfile, fmt: str, n_ctx: int, backend: str = "llamacpp",
                encoder_dtype: str = "fp16", suggest: bool = True, kv_type: str = "f16") -> MemoryPlan:
    from .runtime.kv_cache import kv_type as get_kv_type

    encoder = size.encoder_params * ENCODER_BYTES[encoder_dtype] / GB
    kv_element = get_kv_type(kv_type).bytes_per_element if backend == "llamacpp" else 2.0
    plan = MemoryPlan(
        model=size.name, target=target.name, fmt=fmt, backend=backend, n_ctx=n_ctx,
        weights_gb=size.weight_bytes(fmt) / GB, kv_cache_gb=size.kv_bytes(n_ctx, kv_element) / GB,
        encoder_gb=encoder + (ENCODER_OVERHEAD_GB if size.encoder_params else 0.0),
        overhead_gb=RUNTIME_OVERHEAD_GB[backend], available_gb=available_gb(target),
    )
    if suggest and not plan.fits:
        plan.suggestions = _what_would_fit(size, target, fmt, n_ctx, backend, encoder_dtype, kv_type)
    return plan


def _what_would_fit(size: ModelSize, target: TargetProfile, fmt: str, n_ctx: int, backend: str,
                    encoder_dtype: str, kv_type: str = "f16") -> list[str]:
    """The recipe changes that make the plan fit: for this format and each smaller one, the
    largest context (of the planned one and FALLBACK_CONTEXTS below it) that fits."""
    out = []
    formats = [fmt] + [f for f in FALLBACK_FORMATS if f != fmt and BODY_BITS[f] < BODY_BITS[fmt]]
    for other in formats:
        be = backend if other == fmt else ("trtllm" if other == "int4_awq" else "llamacpp")
        for ctx in [n_ctx] + [c for c in FALLBACK_CONTEXTS if c < n_ctx]:
            p = plan_memory(size, target, other, ctx, be, encoder_dtype, suggest=False, kv_type=kv_type)
            if p.fits:
                change = [other] if other != fmt else []
                change += [f"runtime.n_ctx={ctx}"] if ctx != n_ctx else []
                out.append(f"{' with '.join(change)} ({p.total_gb:.2f} GB)")
                break
    return out


def check_fits(plan: MemoryPlan) -> None:
    """Stop a build before any work when its bundle cannot run on the target."""
    if plan.fits:
        return
    hint = f"; what would fit: {', '.join(plan.suggestions)}" if plan.suggestions else "; no smaller format fits either"
    raise UserError(f"{plan.line()}{hint}")
