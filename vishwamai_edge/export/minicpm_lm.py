"""Our torch reference of the MiniCPM LLM (MiniCPM-2B, the language model of MiniCPM-V 2.0).

transformers has no MiniCPM class (openbmb ships modeling_minicpm.py as remote code, which we do not
run), so this is the published computation written out, in fp32:
- inputs = embed_tokens(ids) * scale_emb (MiniCPMModel.forward); MiniCPM-V 2.0 splices its image
  rows into these scaled text embeddings unscaled (modeling_minicpmv.py `get_vllm_embedding`),
  hence `embed` apart from `forward(inputs_embeds=...)`;
- every decoder layer: h = h + attn(rms(h)) * s, then h = h + mlp(rms(h)) * s, with
  s = scale_depth / sqrt(num_hidden_layers) (MiniCPMDecoderLayer.forward);
- attention is Llama's: rotate-half RoPE at rope_theta, grouped k/v heads, causal; the MLP is
  down(silu(gate(x)) * up(x)); RMSNorm in fp32 with rms_norm_eps;
- logits = lm_head(norm(h) / (hidden_size / dim_model_base)) (MiniCPMForCausalLM.forward); lm_head
  is tied to embed_tokens when the config says so or the checkpoint has no lm_head tensor.
Parameter names are the checkpoint's (`model.layers.N.self_attn.q_proj.weight`, `lm_head.weight`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import SourceError, require
from .torch_state import load_exact, safetensors_state

ARCHITECTURES = ("MiniCPMForCausalLM",)
REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                 "scale_emb", "scale_depth", "dim_model_base")


def is_minicpm_lm(hf_dir: Path) -> bool:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        return False
    return any(a in ARCHITECTURES for a in json.loads(path.read_text()).get("architectures") or [])


def check_config(config: dict[str, Any], where: Path) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise SourceError(f"{where}: a MiniCPM config needs {', '.join(missing)}")


def make_minicpm_lm(config: dict[str, Any], tied: bool) -> Any:
    """A randomly initialised module of the config's sizes; load a checkpoint's state into it."""
    torch = require("torch", "build")
    nn, F = torch.nn, torch.nn.functional
    hidden, n_layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = hidden // n_head
    eps = float(config.get("rms_norm_eps", 1e-5))
    theta = float(config.get("rope_theta", 10000.0))
    residual = float(config["scale_depth"]) / math.sqrt(n_layers)
    scale_emb = float(config["scale_emb"])
    logit_divisor = hidden / float(config["dim_model_base"])

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden))

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate_half(x):
        a, b = x.chunk(2, dim=-1)
        return torch.cat((-b, a), dim=-1)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(hidden, n_head * head_dim, bias=False)
            self.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=False)
            self.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=False)
            self.o_proj = nn.Linear(n_head * head_dim, hidden, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            q = self.q_proj(x).view(b, t, n_head, head_dim).transpose(1, 2)
            k = self.k_proj(x).view(b, t, n_kv, head_dim).transpose(1, 2)
            v = self.v_proj(x).view(b, t, n_kv, head_dim).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            k, v = (z.repeat_interleave(n_head // n_kv, dim=1) for z in (k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, n_head * head_dim))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            inter = int(config["intermediate_size"])
            self.gate_proj = nn.Linear(hidden, inter, bias=False)
            self.up_proj = nn.Linear(hidden, inter, bias=False)
            self.down_proj = nn.Linear(inter, hidden, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm, self.post_attention_layernorm = RMSNorm(), RMSNorm()
            self.self_attn, self.mlp = Attention(), MLP()

        def forward(self, h, cos, sin):
            h = h + self.self_attn(self.input_layernorm(h), cos, sin) * residual
            return h + self.mlp(self.post_attention_layernorm(h)) * residual

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(int(config["vocab_size"]), hidden)
            self.layers = nn.ModuleList(Layer() for _ in range(n_layers))
            self.norm = RMSNorm()

    class MiniCPMCausalLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Body()
            if not tied:
                self.lm_head = nn.Linear(hidden, int(config["vocab_size"]), bias=False)

        def embed(self, input_ids):
            """Text embeddings as the model adds them: scaled by scale_emb."""
            return self.model.embed_tokens(input_ids) * scale_emb

        def forward(self, input_ids=None, inputs_embeds=None):
            h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
            t = h.shape[1]
            inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
            angles = torch.outer(torch.arange(t, dtype=torch.float32), inv_freq)
            angles = torch.cat((angles, angles), dim=-1)
            cos, sin = angles.cos(), angles.sin()
            for layer in self.model.layers:
                h = layer(h, cos, sin)
            h = self.model.norm(h) / logit_divisor
            weight = self.model.embed_tokens.weight if tied else self.lm_head.weight
            return SimpleNamespace(logits=F.linear(h, weight))

    return MiniCPMCausalLM()


def split_state(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The LLM's tensors of a checkpoint (those under `prefix`, e.g. MiniCPM-V's "llm."), prefix removed."""
    return {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}


def load_minicpm_lm(hf_dir: Path, config: dict[str, Any] | None = None, prefix: str = "",
                    state: dict[str, Any] | None = None) -> Any:
    """The checkpoint's MiniCPM LLM in fp32, eval mode; every tensor must match the config."""
    hf_dir = Path(hf_dir)
    config = config if config is not None else json.loads((hf_dir / "config.json").read_text())
    check_config(config, hf_dir / "config.json")
    state = split_state(state if state is not None else safetensors_state(hf_dir, "the language model"), prefix)
    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in state
    if tied:  # a tied config may still store a copy of the embeddings as lm_head
        state.pop("lm_head.weight", None)
    module = make_minicpm_lm(config, tied)
    load_exact(module, state, hf_dir, "MiniCPM language model")
    return module.eval()
