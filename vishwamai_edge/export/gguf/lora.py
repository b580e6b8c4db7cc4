"""A PEFT LoRA adapter (the `finetune` stage's adapter/) -> a LoRA GGUF that llama.cpp applies at run time.

The format llama.cpp reads (its vendored src/llama-adapter.cpp `llama_adapter_lora_init_impl`
and convert_lora_to_gguf.py, llama-cpp-python 0.3.36):
- metadata `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (f32), and
  `general.architecture` equal to the base model's (checked at load);
- per adapted linear, `<base tensor>.lora_a` = PEFT's lora_A [r, in] and `<base tensor>.lora_b` =
  lora_B [out, r], untransposed; the base's row permutations (llama's q/k RoPE order) apply to
  lora_b's rows only; every named base tensor must exist, with in/out widths that match;
- the delta is scale * alpha / r * B (A x), `scale` chosen per context (llama_set_adapters_lora),
  the rank read from the tensors. rsLoRA's alpha / sqrt(r) is written as alpha * sqrt(r).

Adapters that change more than low-rank deltas of linears (DoRA, modules_to_save such as a
retrained embedding, per-layer rank or alpha patterns) cannot be expressed and are refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ...errors import ExportError
from ...fsutil import atomic_file
from .base import converter_for

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OUTTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}
PEFT_PREFIX = "base_model.model."
BASE_DIGEST_KEY = "vishwamai.base_digest"  # the base weights the adapter was trained on (fsutil.weights_digest)


@dataclass
class LoraExport:
    path: Path
    arch: str
    rank: int
    alpha: float
    tensors: int
    base_digest: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "rank": self.rank, "alpha": self.alpha, "tensors": self.tensors,
                "base_digest": self.base_digest, "bytes": self.path.stat().st_size}


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} cannot be read ({exc})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, why in (("use_dora", "DoRA rescales the weight"), ("modules_to_save", "it retrains whole modules"),
                     ("rank_pattern", "ranks differ per layer"), ("alpha_pattern", "alphas differ per layer")):
        if config.get(key):
            raise ExportError(f"{path}: {key} is set ({why}); a llama.cpp LoRA adapter cannot carry that: "
                              "merge the adapter into the model instead")
    return config


def write_lora_gguf(adapter_dir: Path, base_dir: Path, out_path: Path, outtype: str = "f16",
                    base_digest: str | None = None) -> LoraExport:
    """Write `adapter_dir` as a LoRA GGUF for the GGUF of `base_dir` (atomically); shapes are checked
    against the base's tensors, so an adapter trained on another model is refused here."""
    from safetensors import SafetensorError, safe_open

    if outtype not in OUTTYPES:
        raise ExportError(f"unknown adapter GGUF type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    converter = converter_for(Path(base_dir))
    r, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    written_alpha = alpha * math.sqrt(r) if config.get("use_rslora") else alpha
    try:
        f = safe_open(str(adapter_dir / ADAPTER_WEIGHTS), "np")
    except (OSError, SafetensorError) as exc:
        raise ExportError(f"{adapter_dir / ADAPTER_WEIGHTS} cannot be read ({exc})") from None
    pairs: dict[str, dict[str, str]] = {}
    for key in f.keys():  # noqa: SIM118
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if name.endswith(marker):
                pairs.setdefault(name[: -len(marker)] + ".weight", {})[part] = key
                break
        else:
            raise ExportError(f"{adapter_dir}: tensor {key} is no LoRA A/B matrix; only linear-layer LoRA converts")
    tensors: list[tuple[str, np.ndarray]] = []
    for base_name, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise ExportError(f"{adapter_dir}: {base_name} has only {', '.join(parts)}")
        if base_name not in converter.weights:
            raise ExportError(f"{adapter_dir}: the adapter changes {base_name}, which the base {base_dir} does not "
                              "have: it was trained on another model")
        out_f, in_f = converter.weights.shape(base_name)
        a = f.get_tensor(parts["lora_A"]).astype(np.float32)
        b = f.get_tensor(parts["lora_B"]).astype(np.float32)
        if a.shape != (r, in_f) or b.shape != (out_f, r):
            raise ExportError(f"{adapter_dir}: {base_name}: LoRA A {a.shape} / B {b.shape} do not fit the base's "
                              f"{out_f} x {in_f} at rank {r}: it was trained on another model")
        gguf_name = converter.gguf_name(base_name)
        if gguf_name is None:
            raise ExportError(f"{adapter_dir}: {base_name} has no GGUF name for {converter.arch_name}")
        tensors += [(f"{gguf_name}.lora_a", a), (f"{gguf_name}.lora_b", converter.modify_tensor(base_name, b))]
    if not tensors:
        raise ExportError(f"{adapter_dir / ADAPTER_WEIGHTS} holds no LoRA tensors")
    qtype = OUTTYPES[outtype]
    with atomic_file(Path(out_path)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), converter.arch_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, written_alpha)
        if base_digest:
            writer.add_string(BASE_DIGEST_KEY, base_digest)
        for name, data in tensors:
            writer.add_tensor(name, data.astype(np.float16) if qtype == gguf.GGMLQuantizationType.F16 else data,
                              raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return LoraExport(Path(out_path), converter.arch_name, r, written_alpha, len(tensors) // 2, base_digest)


def adapter_base_digest(path: Path) -> str | None:
    """The base digest a LoRA GGUF of ours records (None for adapters made elsewhere)."""
    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get(BASE_DIGEST_KEY)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")
