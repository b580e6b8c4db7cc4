"""TensorRT-LLM W4A16_AWQ checkpoint: names, shapes, config, and an exact INT4 / scale / zero round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vishwamai_edge.errors import ExportError
from vishwamai_edge.export.awq import QuantizedLinear, quantize_awq, quantize_weight, write_hf_awq
from vishwamai_edge.export.trtllm import linear_from_trtllm, pack_int4, unpack_int4, write_trtllm_checkpoint


def test_int4_packing_layout():
    q = torch.randint(-8, 8, (6, 5), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int8 and packed.shape == (3, 5)
    b = packed.view(torch.uint8).long()
    # modelopt's pack_int4_in_uint8: even output row in the low nibble, odd row in the high one
    assert torch.equal(b & 0xF, q[0::2].long() & 0xF) and torch.equal(b >> 4, q[1::2].long() & 0xF)
    assert torch.equal(unpack_int4(packed), q)
    with pytest.raises(ExportError, match="even number of output features"):
        pack_int4(q[:5])


def _ql_equal(a: QuantizedLinear, b: QuantizedLinear) -> bool:
    return torch.equal(a.q, b.q) and torch.equal(a.zeros, b.zeros) and torch.equal(a.scales, b.scales)


def test_checkpoint_from_awq_folder(tiny_model, tmp_path):
    src = tiny_model("llama")  # hidden 64, 4 heads of 16, 2 kv heads, intermediate 128, 2 layers
    result = quantize_awq(src, 32, evaluate=False)
    out = write_trtllm_checkpoint(write_hf_awq(result, src, tmp_path / "awq"), tmp_path / "trt")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "LlamaForCausalLM" and config["dtype"] == "float16"
    assert config["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert config["quantization"]["quant_algo"] == "W4A16_AWQ" and config["quantization"]["group_size"] == 32
    assert config["quantization"]["has_zero_point"] and config["quantization"]["pre_quant_scale"]
    assert (config["hidden_size"], config["num_key_value_heads"], config["head_size"]) == (64, 2, 16)
    t = load_file(out / "rank0.safetensors")
    embed = result.tensors["model.embed_tokens.weight"]
    assert torch.equal(t["transformer.vocab_embedding.weight"], embed)
    assert t["lm_head.weight"].shape == embed.shape
    assert torch.equal(t["transformer.ln_f.weight"], result.tensors["model.norm.weight"])
    for i in range(2):
        p, hf = f"transformer.layers.{i}", f"model.layers.{i}"
        assert torch.equal(t[f"{p}.input_layernorm.weight"], result.tensors[f"{hf}.input_layernorm.weight"])
        assert torch.equal(t[f"{p}.post_layernorm.weight"], result.tensors[f"{hf}.post_attention_layernorm.weight"])
        qkv = t[f"{p}.attention.qkv.weight"]
        assert qkv.dtype == torch.int8 and qkv.shape == ((64 + 32 + 32) // 2, 64)  # fused q, k, v rows
        assert t[f"{p}.attention.qkv.weights_scaling_factor"].shape == (128, 2)  # [out, in/G] in the checkpoint
        assert t[f"{p}.attention.qkv.zero"].shape == (2, 128)  # [in/G, out], the plugin's own layout
        assert torch.equal(t[f"{p}.attention.qkv.prequant_scaling_factor"], torch.ones(64, dtype=torch.float16))
        fused = linear_from_trtllm({k: t[f"{p}.attention.qkv.{k}"] for k in
                                    ("weight", "weights_scaling_factor", "zero")}, 32)
        rows = 0
        for name in ("q_proj", "k_proj", "v_proj"):
            ql = result.linears[f"{hf}.self_attn.{name}"]
            n = ql.q.shape[0]
            part = QuantizedLinear(fused.q[rows:rows + n], fused.zeros[rows:rows + n], fused.scales[rows:rows + n], 32)
            assert _ql_equal(part, ql), name
            rows += n
        for trt, name in (("attention.dense", "self_attn.o_proj"), ("mlp.fc", "mlp.gate_proj"),
                          ("mlp.gate", "mlp.up_proj"), ("mlp.proj", "mlp.down_proj")):
            back = linear_from_trtllm({k: t[f"{p}.{trt}.{k}"] for k in ("weight", "weights_scaling_factor", "zero")},
                                      32)
            assert _ql_equal(back, result.linears[f"{hf}.{name}"]), trt


def test_zero_reproduces_dequantized_weight():
    """q_signed * scale + zero (the plugin's formula) equals (q - z) * scale up to the fp16 rounding of zero."""
    ql = quantize_weight(torch.randn(8, 64), 32)
    from vishwamai_edge.export.trtllm import trtllm_linear

    t = trtllm_linear(ql)
    s = t["weights_scaling_factor"].float().repeat_interleave(32, dim=1)
    zero = t["zero"].T.float().repeat_interleave(32, dim=1)
    w = unpack_int4(t["weight"]).float() * s + zero
    assert (w - ql.dequantize()).abs().max().item() <= 1e-3 * ql.scales.float().max().item() * 8
