"""Structured pruning into a smaller student: whole blocks (depth), MLP channels and query heads (width).

    depth  -> each block is scored by the calibration loss of the model without it, and the blocks whose
              removal hurts least are dropped (one shot: Kim et al. 2024, "Shortened LLaMA", found it as
              good as iterative removal for a fraction of the cost)
    width  -> the channels of every MLP (the inputs of down_proj) and the query heads of every attention
              (the inputs of o_proj, head by head) are ranked by their mean activation magnitude on the
              calibration text (Minitron's criterion); each layer keeps its top `mlp` channels and, in each
              group of query heads sharing a key/value head, its top `heads / kv_heads`. Every layer keeps
              the same numbers, as the configs of these families are uniform.
    output -> a plain HF folder of the smaller config (num_hidden_layers, layer_types, intermediate_size,
              num_attention_heads with head_dim kept), checked against the unpruned model with the same
              parts removed in place (layers skipped, columns of o_proj and down_proj zeroed): the two must
              give the same logits.

The families: decoder blocks at `model.layers`, attention q/k/v/o_proj, MLP gate/up/down_proj (Llama, Mistral,
Qwen2/3, Gemma 1-3). Other architectures are refused in one line rather than cut wrongly.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from ..errors import UserError, quiet_transformers, require
from ..fsutil import atomic_dir, write_json
from ..memory_plan import model_size
from ..recipe import PruneSpec

PRUNE_FILE = "prune.json"
CHECK_TOLERANCE = 1e-3  # max abs logit difference, pruned folder vs the unpruned model with the same parts removed
_PARAM_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}
# model_type -> why its query heads stay: llama.cpp sizes these attentions' query projections by the hidden size
FIXED_HEADS = {"qwen2": "llama.cpp's qwen2 architecture expects query projections as wide as the hidden size"}


class PruneError(UserError):
    """A pruning target this model cannot take."""


@dataclass
class PruneResult:
    layers: tuple[int, int]  # before, after
    dropped: list[int]  # the removed blocks, by their index in the original model
    block_losses: list[float]  # calibration loss of the model without each block (the depth criterion)
    intermediate_size: tuple[int, int]
    heads: tuple[int, int]
    params: tuple[int, int]
    calibration_tokens: int
    loss: tuple[float, float]  # calibration loss of the model before and after pruning
    check_max_abs_diff: float
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- what to keep --------------------------------------------------------------------------
def parse_params(value: int | str) -> int:
    """A parameter budget: 100000000, "100M", "1.5B"."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", value)
    if not m:
        raise PruneError(f"prune.params: {value!r} is not a parameter count (e.g. 90M, 1.5B)")
    return int(float(m.group(1)) * _PARAM_SUFFIX[m.group(2).lower()])


def targets(spec: PruneSpec, config: dict[str, Any], where: str) -> tuple[int, int, int]:
    """(layers, intermediate_size, heads) the student keeps; a target the model cannot take is an error."""
    size = model_size(config, where)
    layers = spec.layers if spec.layers is not None else size.layers
    mlp = spec.mlp if spec.mlp is not None else size.intermediate
    heads = spec.heads if spec.heads is not None else size.heads
    for name, want, have, what in (("layers", layers, size.layers, "blocks"),
                                   ("mlp", mlp, size.intermediate, "MLP channels per block"),
                                   ("heads", heads, size.heads, "attention heads per block")):
        if want > have:
            raise PruneError(f"{where}: prune.{name}: {want} is more than the model's {have} {what}")
    if spec.heads is not None and config.get("model_type") in FIXED_HEADS:
        raise PruneError(f"{where}: prune.heads: not for a {config['model_type']} model: "
                         f"{FIXED_HEADS[config['model_type']]}; prune its layers or mlp")
    if spec.heads is not None and heads % size.kv_heads:
        raise PruneError(f"{where}: prune.heads: {heads} is not a multiple of the model's {size.kv_heads} key/value "
                         "heads (each keeps the same number of query heads)")
    if spec.params is not None:
        budget = parse_params(spec.params)
        shaped = {**size.__dict__, "intermediate": mlp, "heads": heads}
        full = type(size)(**shaped)
        if budget >= full.params:
            raise PruneError(f"{where}: prune.params: {budget:,} is not below the model's {int(full.params):,} "
                             "parameters")
        fits = [n for n in range(1, size.layers + 1) if type(size)(**{**shaped, "layers": n}).params <= budget]
        if not fits:
            raise PruneError(f"{where}: prune.params: {budget:,} is below even one block's model "
                             f"({int(type(size)(**{**shaped, 'layers': 1}).params):,} parameters)")
        layers = min(layers, fits[-1])
    if (layers, mlp, heads) == (size.layers, size.intermediate, size.heads):
        raise PruneError(f"{where}: prune: the target is the model's own size; give layers, mlp, heads or params "
                         "below it")
    return layers, mlp, heads


# -- the model's parts ---------------------------------------------------------------------
def blocks(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise PruneError(f"pruning {type(model).__name__} is not supported: its blocks are not at model.layers")
    return inner, layers


def _parts(layer, names: tuple[str, ...], what: str):
    for name in names:
        if not isinstance(getattr(layer, name, None), _linear()):
            raise PruneError(f"pruning the {what} of {type(layer).__name__} is not supported (no separate {name})")


def _linear():
    return require("torch", "build").nn.Linear


@contextlib.contextmanager
def without_blocks(model, drop: set[int]):
    """The model with the blocks `drop` skipped (the list shortened, as the forward reads it)."""
    torch = require("torch", "build")
    inner, layers = blocks(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n, types = config.num_hidden_layers, getattr(config, "layer_types", None)
    inner.layers = torch.nn.ModuleList([b for i, b in enumerate(layers) if i not in drop])
    config.num_hidden_layers = len(inner.layers)
    if types is not None:
        config.layer_types = [t for i, t in enumerate(types) if i not in drop]
    try:
        yield model
    finally:
        inner.layers, config.num_hidden_layers = layers, n
        if types is not None:
            config.layer_types = types


def mean_loss(model, windows: list[list[int]]) -> float:
    """Mean next-token loss over the calibration windows."""
    torch = require("torch", "build")
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(w) - 1
    return total / max(count, 1)


def block_losses(model, windows: list[list[int]], progress=None) -> list[float]:
    """The calibration loss of the model without each block in turn."""
    _, layers = blocks(model)
    out = []
    for i in range(len(layers)):
        with without_blocks(model, {i}):
            out.append(mean_loss(model, windows))
        if progress is not None:
            progress()
    return out


def channel_importance(model, windows: list[list[int]]) -> tuple[list[Any], list[Any]]:
    """Per block: the mean |activation| of each MLP channel (down_proj's inputs) and the mean norm of each
    query head's output (o_proj's inputs, head by head), over the calibration tokens."""
    torch = require("torch", "build")
    _, layers = blocks(model)
    head_dim = _head_dim(model)
    mlp: list[Any] = [None] * len(layers)
    heads: list[Any] = [None] * len(layers)
    hooks = []
    for i, layer in enumerate(layers):
        _parts(layer.mlp, ("down_proj",), "MLP")
        _parts(layer.self_attn, ("o_proj",), "attention")

        def on_mlp(_m, args, _out, i=i):
            x = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).sum(0)
            mlp[i] = x if mlp[i] is None else mlp[i] + x

        def on_attn(_m, args, _out, i=i):
            x = args[0].detach().float()
            norms = x.reshape(*x.shape[:-1], -1, head_dim).norm(dim=-1).reshape(-1, x.shape[-1] // head_dim).sum(0)
            heads[i] = norms if heads[i] is None else heads[i] + norms

        hooks += [layer.mlp.down_proj.register_forward_hook(on_mlp),
                  layer.self_attn.o_proj.register_forward_hook(on_attn)]
    try:
        with torch.no_grad():
            for w in windows:
                model(input_ids=torch.tensor([w]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return mlp, heads


def _head_dim(model) -> int:
    c = model.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def kept_heads(scores, n_heads: int, n_kv: int, keep: int) -> list[int]:
    """The query heads kept: the best `keep / n_kv` of each group that shares a key/value head, in order."""
    per_group, group = keep // n_kv, n_heads // n_kv
    out: list[int] = []
    for g in range(n_kv):
        idx = list(range(g * group, (g + 1) * group))
        best = sorted(idx, key=lambda h: -float(scores[h]))[:per_group]
        out += sorted(best)
    return out


# -- cutting -------------------------------------------------------------------------------
def _rows(linear, keep, dim: int):
    """A Linear with only the `keep` output rows (dim 0) or input columns (dim 1)."""
    torch = require("torch", "build")
    idx = torch.tensor(keep)
    w = linear.weight.data.index_select(dim, idx)
    out = torch.nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, dtype=w.dtype, device=w.device)
    out.weight.data.copy_(w)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.data.index_select(0, idx) if dim == 0 else linear.bias.data)
    return out


def cut_mlp(layer, keep: list[int]) -> None:
    _parts(layer.mlp, ("gate_proj", "up_proj", "down_proj"), "MLP")
    layer.mlp.gate_proj = _rows(layer.mlp.gate_proj, keep, 0)
    layer.mlp.up_proj = _rows(layer.mlp.up_proj, keep, 0)
    layer.mlp.down_proj = _rows(layer.mlp.down_proj, keep, 1)


def cut_heads(layer, keep: list[int], head_dim: int) -> None:
    _parts(layer.self_attn, ("q_proj", "o_proj"), "attention")
    cols = [h * head_dim + d for h in keep for d in range(head_dim)]
    attn = layer.self_attn
    attn.q_proj = _rows(attn.q_proj, cols, 0)
    attn.o_proj = _rows(attn.o_proj, cols, 1)


def zero_parts(model, mlp_keep: list[list[int]] | None, head_keep: list[list[int]] | None) -> None:
    """The reference of the check: the removed channels and heads zeroed where they enter the residual stream."""
    torch = require("torch", "build")
    _, layers = blocks(model)
    hd = _head_dim(model)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if mlp_keep is not None:
                w = layer.mlp.down_proj.weight
                drop = sorted(set(range(w.shape[1])) - set(mlp_keep[i]))
                w[:, drop] = 0
            if head_keep is not None:
                w = layer.self_attn.o_proj.weight
                drop = [h * hd + d for h in set(range(w.shape[1] // hd)) - set(head_keep[i]) for d in range(hd)]
                w[:, drop] = 0


# -- the stage's work ----------------------------------------------------------------------
def prune_folder(hf_dir: Path, out: Path, spec: PruneSpec, calibration: list[list[int]], where: str,
                 console: Console | None = None) -> PruneResult:
    """`hf_dir` -> `out`, a smaller HF folder (atomically written), checked against the unpruned model."""
    import json
    import shutil
    import time

    torch = require("torch", "build")
    transformers = quiet_transformers()
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    config = json.loads((hf_dir / "config.json").read_text())
    if "text_config" in config or "vision_config" in config:
        raise PruneError(f"{where}: prune: pruning a vision-language model is not supported; prune its language "
                         "model before attaching the encoder")
    n_layers, n_mlp, n_heads = targets(spec, config, where)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    _, layers = blocks(model)
    size = model_size(config, where)
    total_tokens = sum(len(w) for w in calibration)
    params_before = sum(p.numel() for p in model.parameters())

    from .finetune import progress_bar

    notes: list[str] = []
    dropped: list[int] = []
    losses: list[float] = []
    base_loss = mean_loss(model, calibration)
    if n_layers < size.layers:
        with progress_bar(console, "loss") as progress:
            task = progress.add_task("scoring blocks", total=size.layers, loss=base_loss, tps=0.0)
            losses = block_losses(model, calibration, lambda: progress.advance(task))
        dropped = sorted(sorted(range(size.layers), key=lambda i: losses[i])[: size.layers - n_layers])
    mlp_keep = head_keep = None
    if n_mlp < size.intermediate or n_heads < size.heads:
        with console.status("ranking MLP channels and attention heads on the calibration text"):
            mlp_scores, head_scores = channel_importance(model, calibration)
        if n_mlp < size.intermediate:
            mlp_keep = [sorted(torch.topk(s, n_mlp).indices.tolist()) for s in mlp_scores]
        if n_heads < size.heads:
            head_keep = [kept_heads(s, size.heads, size.kv_heads, n_heads) for s in head_scores]

    # the reference: the unpruned model with the same parts removed in place
    zero_parts(model, mlp_keep, head_keep)
    probe = calibration[0][:64]
    with without_blocks(model, set(dropped)), torch.no_grad():
        reference = model(input_ids=torch.tensor([probe]), use_cache=False).logits[0].float()
        pruned_loss = mean_loss(model, calibration)

    # cut: the blocks, then each kept block's MLP and heads
    kept = [i for i in range(size.layers) if i not in set(dropped)]
    inner, _ = blocks(model)
    inner.layers = torch.nn.ModuleList([layers[i] for i in kept])
    for new, old in enumerate(kept):
        block = inner.layers[new]
        if mlp_keep is not None:
            cut_mlp(block, mlp_keep[old])
        if head_keep is not None:
            cut_heads(block, head_keep[old], size.head_dim)
    cfg = model.config
    cfg.num_hidden_layers = len(kept)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    if getattr(cfg, "max_window_layers", None) is not None:  # Qwen2: sliding window from this layer on
        cfg.max_window_layers = sum(1 for i in kept if i < cfg.max_window_layers)
    cfg.intermediate_size = n_mlp
    if n_heads != size.heads:
        cfg.head_dim = size.head_dim  # no longer hidden / heads
        cfg.num_attention_heads = n_heads
        notes.append(f"head_dim {size.head_dim} kept with {n_heads} heads")

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in hf_dir.iterdir():  # tokenizer, chat template, generation config: not the weights
            if f.is_file() and not (tmp / f.name).exists() and not f.name.startswith("model") and f.name != PRUNE_FILE:
                shutil.copy2(f, tmp / f.name)
        student = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        with torch.no_grad():
            got = student(input_ids=torch.tensor([probe]), use_cache=False).logits[0].float()
        diff = float((got - reference).abs().max())
        if not math.isfinite(diff) or diff > CHECK_TOLERANCE:
            raise PruneError(f"the pruned folder's logits differ from the unpruned model with the same parts removed "
                             f"by {diff:.3g} (tolerance {CHECK_TOLERANCE}); it was not written")
        result = PruneResult(
            layers=(size.layers, len(kept)), dropped=dropped, block_losses=[round(x, 5) for x in losses],
            intermediate_size=(size.intermediate, n_mlp), heads=(size.heads, n_heads),
            params=(params_before, sum(p.numel() for p in student.parameters())), calibration_tokens=total_tokens,
            loss=(round(base_loss, 5), round(pruned_loss, 5)), check_max_abs_diff=diff,
            seconds=round(time.perf_counter() - t0, 1), notes=notes,
        )
        write_json(tmp / PRUNE_FILE, result.to_dict())
    return result


def calibration_windows(tokens: list[int], n_tokens: int, window: int) -> list[list[int]]:
    """The first `n_tokens` of a token stream, cut into windows."""
    tokens = tokens[:n_tokens]
    return [tokens[i:i + window] for i in range(0, len(tokens), window) if len(tokens[i:i + window]) > 1]
