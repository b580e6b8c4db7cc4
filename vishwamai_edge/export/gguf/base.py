"""The HF -> GGUF converter core: an architecture registry and a streaming writer.

An architecture registers a small `ModelConverter` subclass that overrides only
what differs: its hyper-parameters and how a tensor is reshaped. Tensors are
read from safetensors one at a time and streamed to the file, so a 7B model
converts without holding it in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import gguf
import numpy as np

from ...errors import ExportError

OUTTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
}


@dataclass
class TensorPlan:
    """One output tensor: its GGUF name, final shape (numpy order), type and how to load it."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]  # returns float32 data in the final shape


_REGISTRY: dict[str, type[ModelConverter]] = {}


def register(*hf_architectures: str):
    def wrap(cls: type[ModelConverter]) -> type[ModelConverter]:
        for name in hf_architectures:
            _REGISTRY[name] = cls
        return cls

    return wrap


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def converter_for(hf_dir: Path) -> ModelConverter:
    config = json.loads((hf_dir / "config.json").read_text())
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in _REGISTRY:
            return _REGISTRY[arch](hf_dir, config)
    raise ExportError(
        f"{hf_dir}: architecture {archs or config.get('model_type')} has no GGUF converter; "
        f"supported: {', '.join(supported_architectures())}"
    )


class SafetensorsFolder:
    """Lazy access to every tensor of an HF folder's *.safetensors files."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            raise ExportError(f"{hf_dir} has no *.safetensors weights")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def load(self, name: str) -> np.ndarray:
        # via torch: numpy has no bfloat16
        return self._where[name].get_tensor(name).float().numpy()

    def __contains__(self, name: str) -> bool:
        return name in self._where


class ModelConverter:
    """Base converter for decoder-only models with HF's `model.layers.N...` naming."""

    arch: ClassVar[gguf.MODEL_ARCH]

    def __init__(self, hf_dir: Path, config: dict[str, Any]):
        self.hf_dir = hf_dir
        self.config = config
        # Vision-language configs nest the language model's settings.
        self.hparams: dict[str, Any] = config.get("text_config", config)
        self.arch_name = gguf.MODEL_ARCH_NAMES[self.arch]
        self.n_layers: int = self.hparams["num_hidden_layers"]
        self.name_map = gguf.get_tensor_name_map(self.arch, self.n_layers)
        self.weights = SafetensorsFolder(hf_dir)

    # -- hyper-parameters --------------------------------------------------------------
    @property
    def n_head(self) -> int:
        return self.hparams["num_attention_heads"]

    @property
    def n_head_kv(self) -> int:
        return self.hparams.get("num_key_value_heads") or self.n_head

    @property
    def head_dim(self) -> int:
        return self.hparams.get("head_dim") or self.hparams["hidden_size"] // self.n_head

    def rope_parameters(self) -> dict[str, Any]:
        """transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`."""
        params = dict(self.hparams.get("rope_parameters") or {})
        if not params:
            params = dict(self.hparams.get("rope_scaling") or {})
            params.setdefault("rope_theta", self.hparams.get("rope_theta", 10000.0))
        params.setdefault("rope_type", params.get("type", "default"))
        return params

    def set_parameters(self, w: gguf.GGUFWriter) -> None:
        h = self.hparams
        w.add_context_length(h.get("max_position_embeddings", 2048))
        w.add_embedding_length(h["hidden_size"])
        w.add_block_count(self.n_layers)
        w.add_feed_forward_length(h["intermediate_size"])
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(h.get("rms_norm_eps", 1e-6))
        w.add_vocab_size(h["vocab_size"])
        if self.head_dim != h["hidden_size"] // self.n_head:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        w.add_rope_dimension_count(self.head_dim)
        rope = self.rope_parameters()
        w.add_rope_freq_base(float(rope["rope_theta"]))
        kind = rope["rope_type"]
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        elif kind == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rope["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        elif kind not in ("default", "llama3"):  # llama3 is carried by a rope_freqs tensor
            raise ExportError(f"{self.hf_dir}: rope type {kind!r} is not supported by the GGUF converter")

    # -- tensors -----------------------------------------------------------------------
    def hf_tensor_names(self) -> list[str]:
        """The language-model tensors to convert (others, e.g. a vision tower, are skipped)."""
        return [n for n in self.weights.names() if not n.endswith("rotary_emb.inv_freq")]

    def modify_tensor(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        """Reshape one tensor for llama.cpp; the default keeps it as it is."""
        return data

    def gguf_name(self, hf_name: str) -> str | None:
        name = hf_name.removeprefix("language_model.")
        name = name.replace("model.language_model.", "model.")
        return self.name_map.get_name(name, try_suffixes=(".weight", ".bias"))

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Tensors llama.cpp needs that HF computes at run time (e.g. llama3 rope factors)."""
        rope = self.rope_parameters()
        if rope["rope_type"] == "llama3":
            yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(
                rope, self.head_dim
            )

    def plan(self, out_qtype: gguf.GGMLQuantizationType) -> list[TensorPlan]:
        plans: list[TensorPlan] = []
        tied = bool(self.config.get("tie_word_embeddings", self.hparams.get("tie_word_embeddings", False)))
        for hf_name in self.hf_tensor_names():
            name = self.gguf_name(hf_name)
            if name is None:
                raise ExportError(f"{self.hf_dir}: tensor {hf_name} has no GGUF name for {self.arch_name}")
            if tied and name == "output.weight":
                continue  # llama.cpp reuses token_embd when output is absent
            shape = self.weights.shape(hf_name)
            plans.append(
                TensorPlan(name, shape, self._tensor_type(name, shape, out_qtype), self._loader(hf_name))
            )
        for name, data in self.extra_tensors():
            plans.append(TensorPlan(name, data.shape, gguf.GGMLQuantizationType.F32, lambda d=data: d))
        return plans

    def _loader(self, hf_name: str) -> Callable[[], np.ndarray]:
        return lambda: self.modify_tensor(hf_name, self.weights.load(hf_name))

    @staticmethod
    def _tensor_type(
        name: str, shape: tuple[int, ...], out_qtype: gguf.GGMLQuantizationType
    ) -> gguf.GGMLQuantizationType:
        # Norms, biases and other 1-D tensors stay F32, as llama.cpp expects.
        if len(shape) < 2 or name.endswith(".bias"):
            return gguf.GGMLQuantizationType.F32
        return out_qtype


def permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows for rotate-half RoPE; llama.cpp's llama arch wants pairs interleaved."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.x's RoPE scaling (llama.cpp reads them as rope_freqs)."""
    base = float(rope["rope_theta"])
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(
        wavelen < old_ctx / high,
        1.0,
        np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    return factors.astype(np.float32)


def write_gguf(
    converter: ModelConverter,
    out_path: Path,
    outtype: str,
    add_vocab: Callable[[gguf.GGUFWriter], None],
    name: str,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Stream the converted model to `out_path`; returns a count of tensor types written."""
    if outtype not in OUTTYPES:
        raise ExportError(f"unknown GGUF output type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    ftype, qtype = OUTTYPES[outtype]
    plans = converter.plan(qtype)

    writer = gguf.GGUFWriter(str(out_path), converter.arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    converter.set_parameters(writer)
    add_vocab(writer)

    for p in plans:
        nbytes = _nbytes(p.shape, p.qtype)
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes, raw_dtype=p.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    counts: dict[str, int] = {}
    for i, p in enumerate(plans):
        data = np.ascontiguousarray(p.load(), dtype=np.float32)
        if data.shape != p.shape:
            raise ExportError(f"tensor {p.name}: shape {data.shape} differs from planned {p.shape}")
        writer.write_tensor_data(_encode(data, p.qtype))
        counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
        if progress:
            progress(i + 1, len(plans))
    writer.close()
    return counts


def _encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * type_size
