"""TensorRT-LLM checkpoint (config.json + rank0.safetensors) for the Llama family, W4A16_AWQ, from our AWQ result.

Layout followed: TensorRT-LLM main (`tensorrt_llm/models/modeling_utils.py`,
`preprocess_perlayer_weights`, read 2026-12) and the writer it expects, nvidia-modelopt 0.47
(`modelopt/torch/export/quant_utils.py` `pack_int4_in_uint8`, `model_config_utils.py`
`pack_linear_weights`):

- `<linear>.weight`: int8 [out/2, in]; byte (j, k) = (q[2j, k] & 0xF) | (q[2j+1, k] << 4) with q the
  signed INT4 code in [-8, 7]. At engine build TensorRT-LLM transposes it to [in, out/2] and runs
  `preprocess_weights_for_mixed_gemm(.., torch.quint4x2, fp16)` (only for int8-typed weights).
- `<linear>.weights_scaling_factor`: [out, in/G] in the checkpoint; TensorRT-LLM transposes it to
  the plugin's [in/G, out] (`WeightOnlyGroupwiseQuantLinear.weights_scaling_factor`).
- `<linear>.prequant_scaling_factor`: [in], reshaped to [1, in]; the input is multiplied by it.
  Our AWQ scales are already folded into the norms and previous linears, so it is all ones.
- `<linear>.zero` (has_zero_point): the plugin's additive zero, [in/G, out], not transposed at
  load; weight = q_signed * scale + zero. With our uint4 codes u and zero point z:
  q_signed = u - 8 and zero = (8 - z) * scale, the rule TensorRT-LLM's own HF-AWQ loader uses
  (`quantization/functional.py` `postprocess_weight_only_groupwise`: `(-qzeros + 8) * scales`).

The v0.12.0-jetson branch (the Orin release line) is, as far as we know, the same for the weight,
scale and pre-quant tensors (the modelopt int8 [out/2, in] format dates from v0.8); it lacks
main's automatic padding of in/out features to max(64, group size), so there every width must be
a multiple of the group size (our AWQ requires that anyway). Not checked against that branch's
source: medium confidence. modelopt itself only writes symmetric W4A16_AWQ (no zero); the
`zero` path is the one TensorRT-LLM's GPTQ and HF-AWQ loaders feed the same kernel with: medium
confidence until an engine is built from this checkpoint on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ExportError, require
from .awq import SUPPORTED_ARCHITECTURES, AwqResult, QuantizedLinear, read_hf_awq

# TRT-LLM name -> HF module names fused along the output dimension (in this order)
LAYER_LINEARS = {
    "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.dense": ("self_attn.o_proj",),
    "mlp.fc": ("mlp.gate_proj",),
    "mlp.gate": ("mlp.up_proj",),
    "mlp.proj": ("mlp.down_proj",),
}
LAYER_NORMS = {"input_layernorm": "input_layernorm", "post_layernorm": "post_attention_layernorm"}


def pack_int4(q_signed):
    """Signed INT4 codes int8 [out, in] in [-8, 7] -> int8 [out/2, in], two output rows a byte, even row low."""
    torch = require("torch", "build")
    if q_signed.shape[0] % 2:
        raise ExportError(f"INT4 packing needs an even number of output features, not {q_signed.shape[0]}")
    q = q_signed.to(torch.int16)
    return ((q[0::2] & 0xF) | ((q[1::2] & 0xF) << 4)).to(torch.uint8).view(torch.int8)


def unpack_int4(packed):
    """int8 [out/2, in] -> signed INT4 codes int8 [out, in]: the inverse of `pack_int4`."""
    torch = require("torch", "build")
    p = packed.view(torch.uint8).to(torch.int16)
    low, high = p & 0xF, p >> 4
    low, high = low - ((low & 0x8) << 1), high - ((high & 0x8) << 1)  # sign-extend 4 bits
    out = torch.empty((packed.shape[0] * 2, packed.shape[1]), dtype=torch.int8)
    out[0::2], out[1::2] = low.to(torch.int8), high.to(torch.int8)
    return out


def trtllm_linear(ql: QuantizedLinear) -> dict:
    """One AWQ linear as TRT-LLM W4A16_AWQ checkpoint tensors (names relative to the linear)."""
    torch = require("torch", "build")
    zero = ((8 - ql.zeros.float()) * ql.scales.float()).half()
    return {
        "weight": pack_int4(ql.q.to(torch.int16) - 8),
        "weights_scaling_factor": ql.scales.contiguous(),
        "prequant_scaling_factor": torch.ones(ql.q.shape[1], dtype=torch.float16),
        "zero": zero.T.contiguous(),
    }


def linear_from_trtllm(tensors: dict, group_size: int) -> QuantizedLinear:
    """Codes, zero points and scales back from one linear's checkpoint tensors: the inverse of `trtllm_linear`."""
    torch = require("torch", "build")
    scales = tensors["weights_scaling_factor"]
    q = (unpack_int4(tensors["weight"]).to(torch.int16) + 8).to(torch.uint8)
    zeros = torch.round(8 - tensors["zero"].T.float() / scales.float()).to(torch.uint8)
    return QuantizedLinear(q, zeros, scales, group_size)


def _fuse(parts: list[QuantizedLinear]) -> QuantizedLinear:
    torch = require("torch", "build")
    if len(parts) == 1:
        return parts[0]
    return QuantizedLinear(torch.cat([p.q for p in parts]), torch.cat([p.zeros for p in parts]),
                           torch.cat([p.scales for p in parts]), parts[0].group_size)


def trtllm_config(hf: dict, group_size: int) -> dict:
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(f"the TensorRT-LLM checkpoint writer supports {', '.join(SUPPORTED_ARCHITECTURES)}, not {arch}")
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    scaling = None
    if rope_type != "default":
        scaling = {"type": rope_type, **{k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}}
    heads = hf["num_attention_heads"]
    return {
        "architecture": "LlamaForCausalLM",
        "dtype": "float16",
        "logits_dtype": "float32",
        "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf["max_position_embeddings"],
        "hidden_size": hf["hidden_size"],
        "num_hidden_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": hf.get("num_key_value_heads", heads),
        "head_size": hf.get("head_dim") or hf["hidden_size"] // heads,
        "hidden_act": hf.get("hidden_act", "silu"),
        "intermediate_size": hf["intermediate_size"],
        "norm_epsilon": hf.get("rms_norm_eps", 1e-6),
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        "rotary_scaling": scaling,
        "attn_bias": bool(hf.get("attention_bias", False)),
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": group_size,
                         "has_zero_point": True, "pre_quant_scale": True, "exclude_modules": ["lm_head"]},
    }


def trtllm_tensors(awq: AwqResult) -> dict:
    cfg = awq.config
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ExportError("the TensorRT-LLM checkpoint writer does not handle linear biases yet")
    t = awq.tensors
    out = {"transformer.vocab_embedding.weight": t["model.embed_tokens.weight"],
           "transformer.ln_f.weight": t["model.norm.weight"],
           "lm_head.weight": t.get("lm_head.weight", t["model.embed_tokens.weight"]).clone()}
    for i in range(cfg["num_hidden_layers"]):
        hf, trt = f"model.layers.{i}", f"transformer.layers.{i}"
        for trt_name, hf_name in LAYER_NORMS.items():
            out[f"{trt}.{trt_name}.weight"] = t[f"{hf}.{hf_name}.weight"]
        for trt_name, hf_names in LAYER_LINEARS.items():
            fused = _fuse([awq.linears[f"{hf}.{n}"] for n in hf_names])
            for suffix, tensor in trtllm_linear(fused).items():
                out[f"{trt}.{trt_name}.{suffix}"] = tensor
    return out


def write_trtllm_checkpoint(awq: AwqResult | Path, out_dir: Path) -> Path:
    """A TRT-LLM checkpoint folder from an AWQ result or an HF AWQ GEMM folder (ours)."""
    safetensors_torch = require("safetensors.torch", "build")
    from ..fsutil import atomic_dir

    if not isinstance(awq, AwqResult):
        awq = read_hf_awq(awq)
    config = trtllm_config(awq.config, awq.group_size)
    tensors = trtllm_tensors(awq)
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "rank0.safetensors"))
    return Path(out_dir)
