"""AWQ INT4: the quantizer, the HF AWQ GEMM checkpoint (read by an unpacker of our own), and AWQ beating RTN on SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vishwamai_edge.errors import ExportError
from vishwamai_edge.export.awq import (
    LINEARS,
    check_awq,
    dequantized_model,
    group_size_for,
    pack_awq_gemm,
    quantize_awq,
    quantize_weight,
    read_hf_awq,
    write_hf_awq,
)
from vishwamai_edge.export.imatrix import CALIBRATION_TEXT

# Written from AutoAWQ 0.2.9 awq/utils/packing_utils.py (unpack_awq + reverse_awq_order), not from our packer.
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4)
    codes = (packed[:, :, None] >> shifts[None, None, :]) & 0xF  # arithmetic shift, masked: sign does not leak
    codes = codes.reshape(packed.shape[0], -1)
    order = torch.arange(codes.shape[1]).reshape(-1, 8)[:, AWQ_REVERSE_ORDER].reshape(-1)
    return codes[:, order]


def test_quantize_weight_codes_and_error():
    w = torch.randn(16, 96) * torch.linspace(0.1, 3, 96)
    ql = quantize_weight(w, 32)
    assert ql.q.dtype == torch.uint8 and int(ql.q.max()) <= 15 and int(ql.zeros.max()) <= 15
    assert ql.scales.dtype == torch.float16 and ql.scales.shape == (16, 3)
    step = ql.scales.float().repeat_interleave(32, dim=1)
    assert ((ql.dequantize() - w).abs() <= step * 0.5 + 1e-3).all()  # round-to-nearest within half a step


def test_awq_gemm_packing_matches_autoawq_order():
    ql = quantize_weight(torch.randn(24, 64), 32)
    qweight, qzeros, scales = pack_awq_gemm(ql)
    assert (qweight.dtype, tuple(qweight.shape)) == (torch.int32, (64, 3))
    assert (qzeros.dtype, tuple(qzeros.shape)) == (torch.int32, (2, 3))
    assert (scales.dtype, tuple(scales.shape)) == (torch.float16, (2, 24))
    assert torch.equal(unpack_awq(qweight), ql.q.T.long())
    assert torch.equal(unpack_awq(qzeros), ql.zeros.T.long())
    # the interleave by hand: nibble 1 of the first word is output column 2, nibble 4 is column 1
    word = int(qweight[0, 0]) & 0xFFFFFFFF
    assert (word >> 4) & 0xF == int(ql.q[2, 0]) and (word >> 16) & 0xF == int(ql.q[1, 0])


def test_errors(tiny_model, tmp_path):
    llama = tiny_model("llama")  # hidden 64, intermediate 128
    with pytest.raises(ExportError, match="group size 128 does not divide the model's hidden_size 64"):
        quantize_awq(llama, 128, evaluate=False)
    with pytest.raises(ExportError, match="calibration set is empty"):
        quantize_awq(llama, 32, calibration=[], evaluate=False)
    with pytest.raises(ExportError, match="supports LlamaForCausalLM only, not Qwen2ForCausalLM"):
        quantize_awq(tiny_model("qwen2"), 32, evaluate=False)


def test_group_size_for():
    class C:
        hidden_size, intermediate_size = 576, 1536

    assert group_size_for(C) == 64
    C.hidden_size = 2560
    assert group_size_for(C) == 128


def test_tiny_checkpoint_round_trip(tiny_model, tmp_path):
    src = tiny_model("llama")
    result = quantize_awq(src, 32, evaluate=False)
    out = write_hf_awq(result, src, tmp_path / "awq")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                             "version": "gemm", "modules_to_not_convert": ["lm_head"]}
    state = load_file(out / "model.safetensors")
    for i in range(2):
        for name in LINEARS:
            key = f"model.layers.{i}.{name}"
            ql = result.linears[key]
            assert f"{key}.weight" not in state
            assert torch.equal(unpack_awq(state[f"{key}.qweight"]), ql.q.T.long())
            assert torch.equal(unpack_awq(state[f"{key}.qzeros"]), ql.zeros.T.long())
            assert torch.equal(state[f"{key}.scales"], ql.scales.T)
    back = read_hf_awq(out)
    assert set(back.linears) == set(result.linears)
    for key, ql in result.linears.items():
        assert torch.equal(back.linears[key].dequantize(), ql.dequantize())
    # our reader's model is the model we quantized: same logits as dequantizing the in-memory result
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        a, b = dequantized_model(result)(ids).logits, dequantized_model(back)(ids).logits
    assert (a - b).abs().max().item() < 1e-3  # fp16 norms either way; only summation order differs


@pytest.fixture(scope="module")
def smollm2_awq():
    from vishwamai_edge.sources.embedded import embedded_hf_dir

    torch.set_num_threads(2)
    src = embedded_hf_dir()
    # hidden 576 = 4.5 x 128: group 64, the largest power of two dividing it. Kept short for 2 cores: six
    # calibration texts (~150 tokens), with the clipping search (the Orin bundle test builds without it);
    # the full default set takes about 8 minutes there (fp 13.59, AWQ 15.54, RTN 19.75 held-out perplexity).
    return src, quantize_awq(src, 64, calibration=CALIBRATION_TEXT[:6], clip=True)


@pytest.mark.slow
def test_smollm2_awq_beats_rtn(smollm2_awq, tmp_path):
    src, result = smollm2_awq
    ppl = check_awq(result)
    print("AWQ", result.numbers())
    assert ppl["fp"] < ppl["awq"] < ppl["rtn"], ppl
    assert ppl["awq"] < ppl["fp"] * 1.5, ppl  # INT4 costs something on a 135M model, not everything
    out = write_hf_awq(result, src, tmp_path / "awq")
    assert json.loads((out / "awq.json").read_text())["perplexity"] == result.perplexity
    state = load_file(out / "model.safetensors")
    key = "model.layers.7.mlp.down_proj"
    assert state[f"{key}.qweight"].shape == (1536, 576 // 8) and state[f"{key}.scales"].shape == (1536 // 64, 576)
    assert torch.equal(unpack_awq(state[f"{key}.qweight"]), result.linears[key].q.T.long())
    assert "lm_head.weight" not in state  # tied to the embedding, kept fp16


@pytest.mark.slow
def test_check_awq_refuses_a_loss(smollm2_awq):
    import dataclasses

    _, result = smollm2_awq
    worse = dataclasses.replace(result, perplexity=dict(result.perplexity, awq=result.perplexity["rtn"] + 1))
    with pytest.raises(ExportError, match="does not beat round-to-nearest"):
        check_awq(worse)
