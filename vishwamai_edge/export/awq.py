"""AWQ INT4 (activation-aware weight quantization) of a Llama-family HF folder, in torch on the CPU.

Why our own: AutoAWQ 0.2.9 is deprecated (its README says so); llm-compressor 0.14.0.1 pins
transformers<=5.17, nvidia-modelopt 0.47's `hf` extra transformers<5.15, and gptqmodel 7.7.0
needs torch>=2.14.1: none runs beside transformers 5.24 and torch 2.13 (checked 2026-12 from
their METADATA). The algorithm follows AutoAWQ's `awq/quantize/quantizer.py`:

- per decoder layer, on calibration text, the inputs of each linear group are collected:
  q/k/v share the input_layernorm output, gate/up the post_attention_layernorm output,
  o_proj and down_proj their own inputs;
- per group, the per-input-channel scale s = mean|x|^alpha (alpha on a 20-point grid in [0, 1))
  that minimises the MSE of the group's output with its weights W*s quantized (group-wise INT4,
  asymmetric with a zero point) and the inputs x/s; x/s is folded into the op before (the RMSNorm
  weight for q/k/v and gate/up, v_proj's rows for o_proj, up_proj's rows for down_proj);
  with grouped-query attention v_proj's rows cannot carry o_proj's scale (one v row feeds
  several o columns), so o_proj is then not scaled (AutoAWQ skips it too);
- optional clipping search per linear (not q/k: attention scores are sensitive), shrinking each
  group's range by up to 50%, minimising the group's partial output error;
- layers are quantized in order, the quantized layer's outputs feeding the next one.

Round-to-nearest (RTN) INT4 at the same group size is the baseline; `check_awq` refuses a
result that does not beat it on held-out perplexity.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ExportError, quiet_transformers, require

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)  # SmolLM2 is one
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ gemm.py `order_map`: nibble i holds column 8c + AWQ_ORDER[i]
N_GRID = 20
CLIP_GRID, CLIP_MAX_SHRINK, CLIP_TOKENS = 20, 0.5, 512

# Held-out text for perplexity: none of it is in the calibration set (imatrix.CALIBRATION_TEXT).
HELDOUT_TEXT = [
    "The river wound slowly through the valley, past old stone farmhouses and fields of wheat. "
    "In the evening the farmers gathered at the inn to talk about the weather and the harvest.",
    "A computer program is a sequence of instructions that a computer can execute. Programs are "
    "written in programming languages such as Python, C and Java, and are translated into machine code.",
    "The human heart has four chambers: two atria and two ventricles. It pumps blood through the "
    "lungs, where it picks up oxygen, and then through the rest of the body.",
    "Once upon a time, a young fox lived at the edge of a great forest. Every morning she ran down "
    "to the stream to drink, and every evening she watched the stars appear above the trees.",
    "Mount Everest is the highest mountain on Earth, rising 8,849 metres above sea level on the "
    "border between Nepal and China. The first confirmed ascent was made in 1953.",
    "To make a simple tomato sauce, soften chopped onion and garlic in olive oil, add the tomatoes "
    "and a pinch of salt, and let it simmer for twenty minutes, stirring now and then.",
]


@dataclass
class QuantizedLinear:
    """Group-wise INT4 weights of one nn.Linear, in its [out, in] layout.

    q: uint8 codes 0..15; zeros: uint8 0..15 per (out, group); scales: fp16 per (out, group).
    The weight is (q - zero) * scale, the convention of AutoAWQ's GEMM checkpoints.
    """

    q: Any
    zeros: Any
    scales: Any
    group_size: int

    def dequantize(self):
        g = self.group_size
        z = self.zeros.float().repeat_interleave(g, dim=1)
        s = self.scales.float().repeat_interleave(g, dim=1)
        return (self.q.float() - z) * s


@dataclass
class AwqResult:
    """A quantized model: INT4 linears by HF module name, every other tensor in fp16, and the numbers."""

    config: dict
    group_size: int
    linears: dict[str, QuantizedLinear]
    tensors: dict[str, Any]  # embeddings, norms (with the AWQ scales folded in), untied lm_head
    perplexity: dict[str, float] = field(default_factory=dict)  # fp, awq, rtn on the held-out text
    clip: bool = True
    calibration_tokens: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    def numbers(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "clip": self.clip, "calibration_tokens": self.calibration_tokens,
                "perplexity": self.perplexity, "seconds": round(self.seconds, 1),
                "peak_rss_mb": round(self.peak_rss_mb)}


# ---------------------------------------------------------------- INT4 group quantization

def quantize_weight(w, group_size: int) -> QuantizedLinear:
    """Asymmetric INT4 per group of `group_size` input columns (AutoAWQ's pseudo_quantize_tensor).

    Codes are computed against the fp16-rounded scale, so that (q - zero) * scale is exactly what
    a loader of the fp16 checkpoint computes.
    """
    torch = require("torch", "build")
    out_f, in_f = w.shape
    wg = w.float().reshape(out_f, in_f // group_size, group_size)
    max_val, min_val = wg.amax(dim=2), wg.amin(dim=2)
    scales = ((max_val - min_val).clamp(min=1e-5) / 15).half()
    s = scales.float()
    zeros = (-torch.round(min_val / s)).clamp(0, 15)
    q = (torch.round(wg / s[..., None]) + zeros[..., None]).clamp(0, 15)
    return QuantizedLinear(q.reshape(out_f, in_f).to(torch.uint8), zeros.to(torch.uint8), scales, group_size)


def fake_quantize(w, group_size: int):
    """The weight as the INT4 checkpoint will hold it, back in float32 (`quantize_weight` then dequantize, fused)."""
    torch = require("torch", "build")
    wg = w.reshape(w.shape[0], -1, group_size)
    max_val, min_val = wg.amax(dim=2, keepdim=True), wg.amin(dim=2, keepdim=True)
    s = ((max_val - min_val).clamp_(min=1e-5) / 15).half().float()
    zeros = torch.round(min_val / s).neg_().clamp_(0, 15)
    q = torch.round(wg / s).add_(zeros).clamp_(0, 15)
    return q.sub_(zeros).mul_(s).reshape(w.shape)


def check_group_size(config, group_size: int) -> None:
    widths = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size}
    for name, width in widths.items():
        if group_size <= 0 or width % group_size:
            raise ExportError(
                f"AWQ group size {group_size} does not divide the model's {name} {width}; "
                f"choose a divisor (group_size_for gives {group_size_for(config)})")


def group_size_for(config, preferred: int = 128) -> int:
    """The preferred group size if it divides every input width, else the largest power of two below it that does.

    SmolLM2-135M (hidden 576 = 4.5 x 128) gets 64.
    """
    g = preferred
    while g >= 16:
        if config.hidden_size % g == 0 and config.intermediate_size % g == 0:
            return g
        g //= 2
    raise ExportError(f"no INT4 group size of 16 or more divides hidden size {config.hidden_size} "
                      f"and intermediate size {config.intermediate_size}")


# ---------------------------------------------------------------- loading and calibration

def _load(hf_dir: Path):
    transformers = quiet_transformers()
    torch = require("torch", "build")
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(f"AWQ export supports {', '.join(SUPPORTED_ARCHITECTURES)} only, not {arch} ({hf_dir})")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                              trust_remote_code=False)
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    return model, tokenizer, config


def _token_ids(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    return [ids[:max_len] for ids in (tokenizer(t)["input_ids"] for t in texts) if len(ids) > 1]


def perplexity(model, samples: list[list[int]]) -> float:
    torch = require("torch", "build")
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in samples:
            t = torch.tensor([ids])
            loss = model(input_ids=t, labels=t).loss.item()
            nll += loss * (len(ids) - 1)
            count += len(ids) - 1
    return float(torch.exp(torch.tensor(nll / count)))


# ---------------------------------------------------------------- the search

def _search_scale(x, linears, forward, reference, group_size: int):
    """The per-input-channel scale of the best alpha; `forward(x)` runs the group with the linears' current weights."""
    torch = require("torch", "build")
    x_mean = x.abs().mean(dim=0)
    originals = [lin.weight.data.clone() for lin in linears]
    best, best_err = None, float("inf")
    for i in range(N_GRID):
        s = x_mean.pow(i / N_GRID).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for lin, w in zip(linears, originals):
            lin.weight.data = fake_quantize(w * s, group_size) / s
        err = (forward(x) - reference).pow(2).mean().item()
        if err < best_err:
            best, best_err = s.clone(), err
    for lin, w in zip(linears, originals):
        lin.weight.data = w
    if best is None or not torch.isfinite(best).all():
        raise ExportError("AWQ scale search found no finite scale; the calibration activations hold NaN or inf")
    return best


def _search_clip(w, x, group_size: int):
    """Per (out row, group) clamp bound minimising the group's partial output error (AutoAWQ's auto_clip)."""
    torch = require("torch", "build")
    out_f, in_f = w.shape
    n_groups = in_f // group_size
    x = x[:: max(1, x.shape[0] // CLIP_TOKENS)][:CLIP_TOKENS]
    xg = x.reshape(-1, n_groups, group_size).permute(1, 2, 0)  # [g, gs, n]
    best_max = torch.empty(out_f, n_groups)
    for start in range(0, out_f, 256):  # rows in chunks: [g, rows, n] stays small
        wc = w[start:start + 256]
        wg = wc.reshape(-1, n_groups, group_size)
        org_max = wg.abs().amax(dim=2)  # [rows, g]
        ref = torch.bmm(wg.permute(1, 0, 2), xg)  # [g, rows, n]
        min_err = torch.full_like(org_max, float("inf"))
        chunk_best = org_max.clone()
        for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
            max_val = org_max * (1 - i / CLIP_GRID)
            clipped = torch.maximum(torch.minimum(wg, max_val[..., None]), -max_val[..., None])
            qw = fake_quantize(clipped.reshape(wc.shape), group_size).reshape(wg.shape)
            err = (torch.bmm(qw.permute(1, 0, 2), xg) - ref).pow(2).mean(dim=2).T  # [rows, g]
            better = err < min_err
            min_err[better], chunk_best[better] = err[better], max_val[better]
        best_max[start:start + 256] = chunk_best
    return best_max


def _apply_clip(lin, max_val, group_size: int) -> None:
    torch = require("torch", "build")
    w = lin.weight.data
    wg = w.reshape(w.shape[0], -1, group_size)
    lin.weight.data = torch.maximum(torch.minimum(wg, max_val[..., None]), -max_val[..., None]).reshape(w.shape)


def _capture_inputs(layer, hidden: list, rope: list):
    """Inputs of q_proj, o_proj, gate_proj and down_proj over all samples, flattened to [tokens, width]."""
    torch = require("torch", "build")
    names = {"self_attn.q_proj": "qkv", "self_attn.o_proj": "o", "mlp.gate_proj": "gate_up", "mlp.down_proj": "down"}
    seen: dict[str, list] = {v: [] for v in names.values()}
    hooks = []
    for name, key in names.items():
        mod = layer.get_submodule(name)
        hooks.append(mod.register_forward_hook(
            lambda _m, inp, _o, key=key: seen[key].append(inp[0].detach().reshape(-1, inp[0].shape[-1]))))
    try:
        outs = [layer(h, position_embeddings=pe) for h, pe in zip(hidden, rope)]
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}, outs


def _quantize_layer(layer, hidden: list, rope: list, group_size: int, clip: bool, gqa: bool):
    torch = require("torch", "build")
    attn, mlp = layer.self_attn, layer.mlp
    x, _ = _capture_inputs(layer, hidden, rope)

    def scale_group(x_in, linears, prev, forward):
        reference = forward(x_in)
        s = _search_scale(x_in, linears, forward, reference, group_size)
        for lin in linears:
            lin.weight.data = lin.weight.data * s
        if isinstance(prev, torch.nn.Linear):  # its output rows are the group's input channels
            prev.weight.data = prev.weight.data / s[:, None]
            if prev.bias is not None:
                prev.bias.data = prev.bias.data / s
        else:  # RMSNorm
            prev.weight.data = prev.weight.data / s
        return x_in / s

    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    x["qkv"] = scale_group(x["qkv"], qkv, layer.input_layernorm,
                           lambda t: torch.cat([lin(t) for lin in qkv], dim=1))
    if not gqa:
        x["o"] = scale_group(x["o"], [attn.o_proj], attn.v_proj, attn.o_proj)
    x["gate_up"] = scale_group(x["gate_up"], [mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm, mlp)
    x["down"] = scale_group(x["down"], [mlp.down_proj], mlp.up_proj, mlp.down_proj)
    if clip:
        for name, lin, key in [("v", attn.v_proj, "qkv"), ("o", attn.o_proj, "o"), ("gate", mlp.gate_proj, "gate_up"),
                               ("up", mlp.up_proj, "gate_up"), ("down", mlp.down_proj, "down")]:
            _apply_clip(lin, _search_clip(lin.weight.data, x[key], group_size), group_size)
    quantized = {}
    for name in LINEARS:
        lin = layer.get_submodule(name)
        quantized[name] = quantize_weight(lin.weight.data, group_size)
        lin.weight.data = quantized[name].dequantize()
    return quantized


def _rtn_model(hf_dir: Path, group_size: int):
    model, _, _ = _load(hf_dir)
    for layer in model.model.layers:
        for name in LINEARS:
            lin = layer.get_submodule(name)
            lin.weight.data = fake_quantize(lin.weight.data, group_size)
    return model


def quantize_awq(hf_dir: Path, group_size: int = 128, *, calibration: list[str] | None = None,
                 heldout: list[str] | None = None, clip: bool = True, max_len: int = 256,
                 evaluate: bool = True) -> AwqResult:
    """AWQ-quantize a Llama-family HF folder; with `evaluate`, also the fp, AWQ and RTN held-out perplexities.

    `calibration` defaults to imatrix's calibration texts and chats (about 500 tokens); the group size
    must divide the hidden and intermediate sizes (see `group_size_for`).
    """
    torch = require("torch", "build")
    from .imatrix import calibration_samples

    start = time.perf_counter()
    model, tokenizer, config = _load(hf_dir)
    check_group_size(model.config, group_size)
    samples = (calibration_samples(tokenizer) if calibration is None
               else _token_ids(tokenizer, calibration, max_len))
    samples = [ids[:max_len] for ids in samples if len(ids) > 1]
    if not samples:
        raise ExportError("the AWQ calibration set is empty: give at least one text of two tokens or more")
    held = _token_ids(tokenizer, heldout if heldout is not None else HELDOUT_TEXT, max_len)
    if evaluate and not held:
        raise ExportError("the held-out text for the AWQ perplexity check is empty")

    ppl = {}
    if evaluate:
        ppl["fp"] = perplexity(model, held)
    cfg = model.config
    gqa = cfg.num_key_value_heads != cfg.num_attention_heads
    linears: dict[str, QuantizedLinear] = {}
    with torch.no_grad():
        inner = model.model
        hidden = [inner.embed_tokens(torch.tensor([ids])) for ids in samples]
        rope = [inner.rotary_emb(h, torch.arange(h.shape[1])[None]) for h in hidden]
        for i, layer in enumerate(inner.layers):
            for name, ql in _quantize_layer(layer, hidden, rope, group_size, clip, gqa).items():
                linears[f"model.layers.{i}.{name}"] = ql
            hidden = [layer(h, position_embeddings=pe) for h, pe in zip(hidden, rope)]  # quantized outputs forward
    tied = bool(config.get("tie_word_embeddings", False))
    tensors = {k: v.detach().half().clone() for k, v in model.state_dict().items()
               if k.removesuffix(".weight") not in linears and not (tied and k == "lm_head.weight")}
    if evaluate:
        ppl["awq"] = perplexity(model, held)
        del model
        ppl["rtn"] = perplexity(_rtn_model(hf_dir, group_size), held)
    return AwqResult(config=config, group_size=group_size, linears=linears, tensors=tensors,
                     perplexity={k: round(v, 4) for k, v in ppl.items()}, clip=clip,
                     calibration_tokens=sum(len(s) for s in samples), seconds=time.perf_counter() - start,
                     peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def check_awq(result: AwqResult) -> dict[str, float]:
    """Refuse an AWQ result that is no better than round-to-nearest on held-out perplexity."""
    ppl = result.perplexity
    if not {"awq", "rtn"} <= set(ppl):
        raise ExportError("the AWQ result carries no perplexities; quantize with evaluate=True")
    if not ppl["awq"] < ppl["rtn"]:
        raise ExportError(f"AWQ INT4 does not beat round-to-nearest INT4 (held-out perplexity "
                          f"{ppl['awq']:.3f} vs {ppl['rtn']:.3f}, fp {ppl.get('fp', float('nan')):.3f})")
    return ppl


# ---------------------------------------------------------------- HF AWQ GEMM checkpoint

def pack_awq_gemm(ql: QuantizedLinear):
    """(qweight int32 [in, out/8], qzeros int32 [in/G, out/8], scales fp16 [in/G, out]) in AutoAWQ's GEMM layout.

    AutoAWQ 0.2.9 `awq/modules/linear/gemm.py` (WQLinear_GEMM.from_linear): for each block of 8
    output columns, nibble i (bits 4i..4i+3) of the int32 holds column 8c + order_map[i], with
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]; qzeros are packed the same way.
    """
    return _pack_cols(ql.q.T), _pack_cols(ql.zeros.T), ql.scales.T.contiguous()


def _pack_cols(codes):
    """uint8 codes [rows, cols] -> int32 [rows, cols/8], AWQ nibble order."""
    torch = require("torch", "build")
    rows, cols = codes.shape
    if cols % 8:
        raise ExportError(f"AWQ GEMM packing needs a multiple of 8 output features, not {cols}")
    blocks = codes.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    packed = (blocks << shifts).sum(dim=2)
    return torch.from_numpy(packed.numpy().astype("uint32").view("int32"))


def _unpack_cols(packed):
    """int32 [rows, cols/8] -> uint8 codes [rows, cols]: the inverse of `_pack_cols`."""
    torch = require("torch", "build")
    rows, n = packed.shape
    u = torch.from_numpy(packed.numpy().view("uint32").astype("int64"))
    nibbles = (u[:, :, None] >> torch.arange(0, 32, 4, dtype=torch.int64)) & 0xF  # nibble i
    codes = torch.empty_like(nibbles)
    codes[:, :, list(AWQ_ORDER)] = nibbles
    return codes.reshape(rows, n * 8).to(torch.uint8)


def awq_quantization_config(group_size: int) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": ["lm_head"]}


def write_hf_awq(result: AwqResult, hf_dir: Path, out_dir: Path) -> Path:
    """An HF AWQ GEMM folder: config.json with quantization_config, model.safetensors, the source's tokenizer files."""
    torch = require("torch", "build")
    safetensors_torch = require("safetensors.torch", "build")
    from ..fsutil import atomic_dir

    tensors = dict(result.tensors)
    for name, ql in result.linears.items():
        qweight, qzeros, scales = pack_awq_gemm(ql)
        tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"] = qweight, qzeros, scales
    config = dict(result.config, dtype="float16", quantization_config=awq_quantization_config(result.group_size))
    config.pop("torch_dtype", None)
    with atomic_dir(out_dir) as tmp:
        for f in Path(hf_dir).iterdir():
            if f.is_file() and f.name not in ("config.json", "source.json", ".complete") and not f.name.endswith(
                    (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json")):
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "awq.json").write_text(json.dumps(result.numbers(), indent=2) + "\n")
        safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                                    metadata={"format": "pt"})
    del torch
    return Path(out_dir)


def read_hf_awq(awq_dir: Path) -> AwqResult:
    """Read back an HF AWQ GEMM folder (ours or AutoAWQ's) into codes, zeros and scales."""
    safetensors_torch = require("safetensors.torch", "build")
    awq_dir = Path(awq_dir)
    config = json.loads((awq_dir / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "awq" or qc.get("bits") != 4 or qc.get("version", "gemm").lower() != "gemm" \
            or not qc.get("zero_point", True):
        raise ExportError(f"{awq_dir} is not a 4-bit AWQ GEMM checkpoint with zero points (quantization_config {qc})")
    state: dict = {}
    for f in sorted(awq_dir.glob("*.safetensors")):
        state.update(safetensors_torch.load_file(str(f)))
    g = int(qc["group_size"])
    linears = {}
    for key in [k for k in state if k.endswith(".qweight")]:
        name = key.removesuffix(".qweight")
        q = _unpack_cols(state.pop(key)).T.contiguous()
        zeros = _unpack_cols(state.pop(f"{name}.qzeros")).T.contiguous()
        scales = state.pop(f"{name}.scales").T.contiguous()
        linears[name] = QuantizedLinear(q, zeros, scales, g)
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    return AwqResult(config=config, group_size=g, linears=linears, tensors=state)


def dequantized_model(result: AwqResult):
    """The torch model with INT4 weights dequantized (float32), for checks."""
    transformers = quiet_transformers()
    torch = require("torch", "build")
    config = transformers.AutoConfig.for_model(**{k: v for k, v in result.config.items()
                                                  if k not in ("architectures", "transformers_version")})
    model = transformers.LlamaForCausalLM(config).float().eval()
    state = {k: v.float() for k, v in result.tensors.items()}
    state.update({f"{k}.weight": ql.dequantize() for k, ql in result.linears.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ExportError(f"AWQ tensors do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    del torch
    return model


def is_awq_checkpoint(hf_dir: Path) -> bool:
    try:
        config = json.loads((Path(hf_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (config.get("quantization_config") or {}).get("quant_method") == "awq"


def dequantize_awq_folder(awq_dir: Path, out_dir: Path) -> Path:
    """A pre-quantized AWQ checkpoint as a plain fp16 HF folder (for the GGUF export and its torch
    check); written into `out_dir`, which the caller makes atomic. The INT4 values stay as they are:
    dequantized exactly, not quantized again."""
    import shutil

    torch = require("torch", "build")
    model = dequantized_model(read_hf_awq(awq_dir)).to(torch.float16)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in Path(awq_dir).iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "chat_template"))
                            or f.name in ("generation_config.json",) or f.suffix == ".model"):
            shutil.copy2(f, Path(out_dir) / f.name)
    del torch
    return Path(out_dir)
