"""Pre-quantized AWQ checkpoints in TinyChat's layout (MIT Han Lab llm-awq, the format of VILA *-AWQ).

VILA1.5-3b-AWQ keeps its vision_tower/ and mm_projector/ in fp16 and its language model as one
tensor file, `llm/vila-1.5-3b-w4-g128-awq-v2.pt`: `torch.save(model.state_dict())` of the
quantized LLM (llm-awq awq/entry.py). It is read with `torch.load(weights_only=True)`, which
loads tensors and refuses any other object, so no code in it can run.

Per quantized linear (every nn.Linear of the decoder layers; embeddings, norms and lm_head stay
fp16), the v2 WQLinear buffers (llm-awq awq/quantize/qmodule.py, from commit 5f06dbb on):
    qweight       int16 [out/4, in]       4-bit codes 0..15, interleaved for TinyChat's kernels
    scales        fp16  [G_pad, out]      G_pad = ceil(in/group/8)*8, rows past in/group are zero
    scaled_zeros  fp16  [G_pad, out]      -(scales * zeros), zeros the integer zero points 0..15
    weight = q * scales + scaled_zeros (no offset of 8), per group of `group` input columns.

`pack_intweight` (qmodule.py; interleave 4, kstride 64) turns codes W [N=out, K=in] into qweight:
    1. W.reshape(N, K/32, 4, 4, 2).transpose(0, 1, 3, 2, 4) -> (N, K)
    2. .reshape(N, K/32, 4, 4, 2).transpose(0, 1, 2, 4, 3) -> (N, K)   (within 8: 0,2,4,6,1,3,5,7)
    3. .reshape(N/4, 4, K/64, 64).transpose(0, 2, 1, 3).reshape(N/4, K/64, 64, 4)
    4. int16 = v[..., 0] | v[..., 1] << 4 | v[..., 2] << 8 | v[..., 3] << 12, reshaped to (N/4, K)
`unpack_qweight` undoes the steps in reverse. The integer zero points come back exactly as
round(-scaled_zeros / scales) (the fp16 rounding of scaled_zeros is far below half a scale),
and each is checked to give back the stored scaled_zeros bit for bit: the codes, zero points
and scales are the quantizer's own, and nothing is quantized again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import SourceError, require
from ..sources.pickles import load_tensors
from .awq import LINEARS, AwqResult, QuantizedLinear

FILE_PATTERN = "*awq*.pt"
INTERLEAVE, KSTRIDE = 4, 64
PAD_GROUPS = 8  # calculate_zeros_width rounds the group count up to a multiple of 8 (pack_num)


def find_checkpoint(llm_dir: Path) -> Path | None:
    found = sorted(Path(llm_dir).glob(FILE_PATTERN))
    if len(found) > 1:
        raise SourceError(f"{llm_dir}: several AWQ .pt files ({', '.join(f.name for f in found)}); keep one")
    return found[0] if found else None


def group_size_of(path: Path) -> int:
    """From the file name's `-g<N>-` (llm-awq names them so, e.g. vila-1.5-3b-w4-g128-awq-v2.pt)."""
    m = re.search(r"-w4-g(\d+)-", Path(path).name)
    if not m:
        raise SourceError(f"{path}: the file name says no group size (TinyChat names files *-w4-g128-awq-v2.pt)")
    return int(m.group(1))


def unpack_qweight(qweight: Any) -> Any:
    """int16 [N/4, K] -> uint8 codes [N, K]: the inverse of llm-awq's pack_intweight."""
    import numpy as np

    torch = require("torch", "build")
    n4, k = qweight.shape
    n = n4 * INTERLEAVE
    if k % KSTRIDE:
        raise SourceError(f"a TinyChat qweight of {k} input features is not a multiple of {KSTRIDE}")
    packed = qweight.numpy().view(np.uint16).reshape(n4, k // KSTRIDE, KSTRIDE).astype(np.int64)
    v = np.stack([(packed >> (4 * t)) & 0xF for t in range(4)], axis=-1)  # (N/4, K/64, 64, 4)
    w = v.reshape(n4, k // KSTRIDE, INTERLEAVE, KSTRIDE).transpose(0, 2, 1, 3).reshape(n, k)  # undo step 3
    w = w.reshape(n, k // 32, 4, 2, 4).transpose(0, 1, 2, 4, 3).reshape(n, k)  # undo step 2
    w = w.reshape(n, k // 32, 4, 4, 2).transpose(0, 1, 3, 2, 4).reshape(n, k)  # undo step 1
    return torch.from_numpy(np.ascontiguousarray(w).astype(np.uint8))


def _linear(name: str, state: dict[str, Any], out_f: int, in_f: int, group: int, where: Path) -> QuantizedLinear:
    torch = require("torch", "build")
    try:
        qweight, scales, szeros = (state.pop(f"{name}.{k}") for k in ("qweight", "scales", "scaled_zeros"))
    except KeyError as exc:
        raise SourceError(f"{where}: {exc.args[0]} is missing (not a TinyChat v2 AWQ checkpoint)") from None
    groups = in_f // group
    g_pad = -(-groups // PAD_GROUPS) * PAD_GROUPS
    if tuple(qweight.shape) != (out_f // INTERLEAVE, in_f) or tuple(scales.shape) != (g_pad, out_f) \
            or tuple(szeros.shape) != (g_pad, out_f):
        raise SourceError(f"{where}: {name}: qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)} do not fit "
                          f"a {out_f} x {in_f} linear at group {group} (want [{out_f // INTERLEAVE}, {in_f}] and "
                          f"[{g_pad}, {out_f}])")
    q = unpack_qweight(qweight)
    s = scales[:groups].T.contiguous().half()  # [out, groups]
    sz = szeros[:groups].T.contiguous().half()
    zeros = torch.round(-sz.float() / s.float()).clamp(0, 15)
    if not torch.equal((-(s.float() * zeros)).half(), sz):
        raise SourceError(f"{where}: {name}: scaled_zeros are not -(scales * integer zero points)")
    return QuantizedLinear(q, zeros.to(torch.uint8), s, group)


def read_tinychat_awq(pt_path: Path, llm_config: dict[str, Any]) -> AwqResult:
    """A TinyChat v2 AWQ file + its LLM's config.json -> our AwqResult (codes, zero points, scales)."""
    pt_path = Path(pt_path)
    group = group_size_of(pt_path)
    state = load_tensors(pt_path)
    hidden, inter = int(llm_config["hidden_size"]), int(llm_config["intermediate_size"])
    heads = int(llm_config["num_attention_heads"])
    head_dim = int(llm_config.get("head_dim") or hidden // heads)
    kv = int(llm_config.get("num_key_value_heads") or heads) * head_dim
    shapes = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv, hidden),
              "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    linears = {}
    for i in range(int(llm_config["num_hidden_layers"])):
        for lin in LINEARS:
            name = f"model.layers.{i}.{lin}"
            linears[name] = _linear(name, state, *shapes[lin], group, pt_path)
    tensors = {k: v.half() for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if "model.embed_tokens.weight" not in tensors:
        raise SourceError(f"{pt_path}: model.embed_tokens.weight is missing (not an LLM state dict)")
    config = {k: v for k, v in llm_config.items() if k != "quantization_config"}
    return AwqResult(config=config, group_size=group, linears=linears, tensors=tensors)


def write_awq_folder(pt_path: Path, llm_dir: Path, out_dir: Path) -> Path:
    """The TinyChat checkpoint as our HF AWQ GEMM folder (what the TensorRT-LLM writer and the
    dequantizer read), into `out_dir`, which `write_hf_awq` makes atomically."""
    from .awq import write_hf_awq

    config = json.loads((Path(llm_dir) / "config.json").read_text())
    result = read_tinychat_awq(pt_path, config)
    result.config = {**result.config, "architectures": config.get("architectures") or ["LlamaForCausalLM"]}
    return write_hf_awq(result, llm_dir, out_dir)
