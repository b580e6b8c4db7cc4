"""Whisper (WhisperForConditionalGeneration) -> encoder + decoder ONNX graphs, checked against torch.

Why not optimum's exporter: optimum-onnx 0.1.0 (its latest release) requires
`transformers<4.58.0,>=4.36` and `optimum~=2.1.0` (wheel METADATA), and this project is on
transformers 5. So the graphs come from torch.onnx.export (TorchScript, opset 17) over
small wrappers of transformers' own WhisperEncoder / WhisperDecoder; the wrappers turn
transformers 5's EncoderDecoderCache (two DynamicCaches) into plain tensors in and out.

Three graphs, not one merged decoder: the first decoder step must compute the
cross-attention keys and values from the encoder states, the later ones only read
them; one graph would recompute them every token (or need an If node). The contract
(names, axes) is in `runtime.whisper`, which is what reads the folder.

Attention is exported in its eager form (matmul, softmax): the check compares ONNX
Runtime with the model as loaded (SDPA on torch's side).
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ExportError, quiet_transformers, require
from ...runtime.whisper import (
    DECODER_INIT,
    DECODER_WITH_PAST,
    DESCRIPTION,
    ENCODER,
    ENCODER_OUT,
    ENCODER_STATES,
    FEATURES,
    GENERATION_CONFIG,
    IDS,
    LOGITS,
    N_FRAMES,
    TOKENIZER,
    DecodingSpec,
    past_names,
    present_names,
)
from .base import OPSET, _cosine, _to_fp16

DTYPES = ("fp32", "fp16", "int8")
FORCED_STEPS = 5  # decoder_with_past steps checked after the prompt
# Per dtype, against torch fp32 (relative = max |onnx - torch| / max |torch|).
# Encoder: last_hidden_state. Decoder: logits of the prompt (decoder_init) and of 5
# forced tokens fed one by one through decoder_with_past, every position compared
# with one teacher-forced torch pass without cache. Measured on the tiny random test
# models (tests/whisper_models.py: d_model 64, 2 layers, init std 0.3, tiny.en's
# 51864-token vocabulary; English-only and multilingual prompts):
#   fp32  encoder 2.8e-6 relative; logits 0.8e-6 .. 1.2e-6 relative; top-1 all agree
#   fp16  encoder 3.5e-3 (cosine 0.99998); logits 2.0e-3 .. 2.4e-3; top-1 all agree
#   int8  encoder 6.8e-2 (cosine 0.995); logits 4.3e-2 .. 5.2e-2; top-1 0.93 .. 0.94
# fp32's encoder limit is the larger of the table's and FP32_FLOOR_FACTOR x the model's own fp32
# rounding: torch fp32 against torch float64 on the same inputs, measured at every export. No fp32
# implementation can be held closer to torch than torch is to the exact result: ONNX Runtime sums in
# another order (MLAS and oneDNN pick AVX2, AVX-512 or NEON kernels by CPU), so its error and
# torch's are of the same size and add up to at most twice it. The real tiny.en encoder (outputs
# up to 15) measured torch fp32 at 1.85e-4 relative from float64 and ONNX Runtime at 2.08e-4 from
# torch on an AVX2 host: over the table's 1e-4 on every CPU, while the tiny test models stay near
# 3e-6. Factor 3 leaves the kernels' spread room without letting a real defect through (a wrong
# op moves the output by percents).
FP32_FLOOR_FACTOR = 3.0
TOLERANCE: dict[str, dict[str, float]] = {
    "fp32": {"encoder_max_rel_diff": 1e-4, "logits_max_rel_diff": 1e-4, "min_top1_agreement": 1.0},
    "fp16": {"encoder_max_rel_diff": 1e-2, "logits_max_rel_diff": 1e-2, "min_top1_agreement": 0.9},
    "int8": {"encoder_max_rel_diff": 0.15, "logits_max_rel_diff": 0.15, "min_top1_agreement": 0.75},
}


@dataclass
class WhisperExportInfo:
    path: Path  # the folder
    dtype: str
    opset: int
    n_mels: int
    n_frames: int
    encoder_positions: int
    d_model: int
    decoder_layers: int
    decoder_heads: int
    head_dim: int
    vocab_size: int
    max_target_positions: int
    prompt: list[int]  # the default decoder prompt (English, transcribe, no timestamps)
    check: dict[str, Any] = field(default_factory=dict)
    io_dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": {"encoder": ENCODER, "decoder_init": DECODER_INIT, "decoder_with_past": DECODER_WITH_PAST,
                      "tokenizer": TOKENIZER, "generation_config": GENERATION_CONFIG},
            "dtype": self.dtype, "io_dtype": self.io_dtype, "opset": self.opset,
            "n_mels": self.n_mels, "n_frames": self.n_frames, "encoder_positions": self.encoder_positions,
            "d_model": self.d_model, "decoder_layers": self.decoder_layers, "decoder_heads": self.decoder_heads,
            "head_dim": self.head_dim, "vocab_size": self.vocab_size,
            "max_target_positions": self.max_target_positions, "prompt": self.prompt, "check": self.check,
        }


# -- the torch modules that are exported ----------------------------------------------------


def _graphs(model: Any) -> tuple[Any, Any, Any]:
    """(encoder, decoder_init, decoder_with_past) torch modules with plain tensors in and out."""
    torch = require("torch", "build")
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    layers = model.config.decoder_layers

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = model.model.encoder

        def forward(self, input_features):
            return self.encoder(input_features=input_features, return_dict=True).last_hidden_state

    class DecoderInit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = model.model.decoder
            self.proj_out = model.proj_out

        def forward(self, input_ids, encoder_hidden_states):
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            out = self.decoder(input_ids=input_ids, encoder_hidden_states=encoder_hidden_states, cache=cache,
                               use_cache=True, return_dict=True)
            flat = []
            for i in range(layers):
                own, cross = out.cache.self_attention_cache.layers[i], out.cache.cross_attention_cache.layers[i]
                flat += [own.keys, own.values, cross.keys, cross.values]
            return (self.proj_out(out.last_hidden_state), *flat)

    class DecoderWithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = model.model.decoder
            self.proj_out = model.proj_out

        def forward(self, input_ids, *past):
            # the legacy per-layer (self k, self v, cross k, cross v) form; EncoderDecoderCache
            # marks a layer's cross attention as computed when its cache is not empty
            cache = EncoderDecoderCache(tuple(tuple(past[4 * i:4 * i + 4]) for i in range(layers)))
            start = past[0].shape[2]
            positions = (torch.arange(input_ids.shape[1]) + start).unsqueeze(0).expand(input_ids.shape[0], -1)
            # WhisperDecoderLayer skips cross attention when encoder_hidden_states is None; any
            # tensor will do, its keys and values come from the cache (a layer 0 cross key here)
            out = self.decoder(input_ids=input_ids, encoder_hidden_states=past[2], cache=cache,
                               position_ids=positions, use_cache=True, return_dict=True)
            flat = []
            for i in range(layers):
                own = out.cache.self_attention_cache.layers[i]
                flat += [own.keys, own.values]
            return (self.proj_out(out.last_hidden_state), *flat)

    return Encoder().eval(), DecoderInit().eval(), DecoderWithPast().eval()


def _export(module: Any, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]], opset: int, fold: bool = True) -> None:
    import warnings

    torch = require("torch", "build")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation notices about code we do not own
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=inputs,
                          output_names=outputs, dynamic_axes=axes, do_constant_folding=fold)


def _export_fp32(model: Any, folder: Path, opset: int) -> None:
    torch = require("torch", "build")
    encoder, init, with_past = _graphs(model)
    cfg = model.config
    layers = cfg.decoder_layers
    features = torch.zeros(1, cfg.num_mel_bins, N_FRAMES)
    _export(encoder, (features,), folder / ENCODER, [FEATURES], [ENCODER_OUT],
            {FEATURES: {0: "batch"}, ENCODER_OUT: {0: "batch"}}, opset)

    with torch.no_grad():
        states = encoder(features)
    ids = torch.full((1, 3), int(cfg.decoder_start_token_id), dtype=torch.long)
    init_out = present_names(layers, cross=True)
    axes = {IDS: {0: "batch", 1: "seq"}, ENCODER_STATES: {0: "batch"}, LOGITS: {0: "batch", 1: "seq"}}
    axes |= {n: ({0: "batch", 2: "seq"} if ".decoder." in n else {0: "batch"}) for n in init_out}
    # no constant folding in the decoders: it stores the tied embedding a second time, transposed
    # for the output projection (80 MB more per graph for tiny.en in fp32)
    _export(init, (ids, states), folder / DECODER_INIT, [IDS, ENCODER_STATES], [LOGITS, *init_out], axes, opset,
            fold=False)

    with torch.no_grad():
        past = init(ids, states)[1:]
    past_in, past_out = past_names(layers), present_names(layers, cross=False)
    axes = {IDS: {0: "batch"}, LOGITS: {0: "batch"}}
    axes |= {n: ({0: "batch", 2: "past"} if ".decoder." in n else {0: "batch"}) for n in past_in}
    axes |= {n: {0: "batch", 2: "total"} for n in past_out}
    _export(with_past, (ids[:, :1], *past), folder / DECODER_WITH_PAST, [IDS, *past_in], [LOGITS, *past_out],
            axes, opset, fold=False)


def _to_int8(src: Path, dst: Path) -> None:
    # MatMul and Gather only: quantising the two Conv layers of the mel stem as well doubled the
    # encoder's error (0.07 -> 0.14 relative on the tiny test model) for a few kilobytes of weights.
    from .base import to_int8

    to_int8(src, dst, ["MatMul", "Gather"])


# -- loading --------------------------------------------------------------------------------


def load_whisper_source(source: Path | str | Any) -> tuple[Any, dict[str, Any], Path | None]:
    """(fp32 eager-attention model, generation config dict, folder or None) from a folder or a model."""
    torch = require("torch", "build")
    transformers = quiet_transformers()
    if isinstance(source, (str, Path)):
        hf_dir = Path(source)
        if not (hf_dir / "config.json").is_file():
            raise ExportError(f"{hf_dir} is not a model folder (no config.json)")
        config = transformers.AutoConfig.from_pretrained(hf_dir, trust_remote_code=False)
        if getattr(config, "model_type", None) != "whisper":
            raise ExportError(f"{hf_dir}: model type {config.model_type!r} is not Whisper")
        model = transformers.WhisperForConditionalGeneration.from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation="eager")
    else:
        hf_dir = None
        if not hasattr(source, "proj_out") or getattr(source.config, "model_type", None) != "whisper":
            raise ExportError(f"{type(source).__name__} is not a WhisperForConditionalGeneration")
        model = copy.deepcopy(source).float()  # the caller's model keeps its dtype and attention
        model.set_attn_implementation("eager")
    gen = model.generation_config.to_dict() if model.generation_config is not None else {}
    if hf_dir is not None and (hf_dir / GENERATION_CONFIG).is_file():
        gen = json.loads((hf_dir / GENERATION_CONFIG).read_text())
    return model.eval(), gen, hf_dir


def _tokenizer_file(hf_dir: Path | None, tokenizer: Path | str | None) -> Path:
    for candidate in ([Path(tokenizer)] if tokenizer else []) + ([hf_dir] if hf_dir else []):
        path = candidate / TOKENIZER if candidate.is_dir() else candidate
        if path.is_file():
            return path
    where = tokenizer or hf_dir or "the model"
    raise ExportError(f"no {TOKENIZER} in {where}: the device detokenizes with it (pass tokenizer=)")


# -- export and check -------------------------------------------------------------------------


def export_whisper(
    source: Path | str | Any,
    out_dir: Path | str,
    dtype: str = "fp32",
    *,
    opset: int = OPSET,
    tokenizer: Path | str | None = None,
    check_features: list[np.ndarray] | None = None,
    tolerance: dict[str, float] | None = None,
    threads: int | None = None,
) -> WhisperExportInfo:
    """Export a Whisper model to the folder `out_dir` (see runtime.whisper) and check it against torch.

    `source` is a Whisper folder or a WhisperForConditionalGeneration. `check_features`
    are (n_mels, 3000) log-mels for the check, on top of two random ones. Raises
    ExportError when ONNX Runtime is outside `tolerance` (default TOLERANCE[dtype]);
    nothing is left at `out_dir` then.
    """
    from ...fsutil import atomic_dir, write_json

    if dtype not in DTYPES:
        raise ExportError(f"unknown Whisper export dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    model, gen, hf_dir = load_whisper_source(source)
    tok_file = _tokenizer_file(hf_dir, tokenizer)
    cfg = model.config
    spec = DecodingSpec.from_generation_config(gen, int(cfg.max_target_positions))
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if dtype == "fp32":
            _export_fp32(model, tmp, opset)
        else:
            fp32 = tmp / ".fp32"
            fp32.mkdir()
            try:
                _export_fp32(model, fp32, opset)
                for name in (ENCODER, DECODER_INIT, DECODER_WITH_PAST):
                    (_to_fp16 if dtype == "fp16" else _to_int8)(fp32 / name, tmp / name)
            finally:
                shutil.rmtree(fp32, ignore_errors=True)
        shutil.copy(tok_file, tmp / TOKENIZER)
        (tmp / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")
        check = check_against_torch(model, tmp, spec.prompt, check_features, threads=threads)
        limits = dict(tolerance or TOLERANCE[dtype])
        if dtype == "fp32" and tolerance is None:
            floor = FP32_FLOOR_FACTOR * check["encoder"]["fp32_rounding_rel"]
            limits["encoder_max_rel_diff"] = max(limits["encoder_max_rel_diff"], floor)
        check["tolerance"] = limits
        enc, dec = check["encoder"], check["decoder"]
        if (enc["max_rel_diff"] > limits["encoder_max_rel_diff"]
                or dec["max_rel_diff"] > limits["logits_max_rel_diff"]
                or dec["top1_agreement"] < limits["min_top1_agreement"]):
            raise ExportError(
                f"the {dtype} Whisper export differs from torch beyond tolerance: encoder max rel diff "
                f"{enc['max_rel_diff']:.3g} (allowed {limits['encoder_max_rel_diff']:.3g}), logits max rel diff "
                f"{dec['max_rel_diff']:.3g} (allowed {limits['logits_max_rel_diff']:.3g}), top-1 agreement "
                f"{dec['top1_agreement']:.3f} (allowed {limits['min_top1_agreement']})"
            )
        info = WhisperExportInfo(
            path=out_dir, dtype=dtype, opset=opset, n_mels=int(cfg.num_mel_bins), n_frames=N_FRAMES,
            encoder_positions=int(cfg.max_source_positions), d_model=int(cfg.d_model),
            decoder_layers=int(cfg.decoder_layers), decoder_heads=int(cfg.decoder_attention_heads),
            head_dim=int(cfg.d_model // cfg.decoder_attention_heads), vocab_size=int(cfg.vocab_size),
            max_target_positions=int(cfg.max_target_positions), prompt=spec.prompt, check=check,
        )
        write_json(tmp / DESCRIPTION, info.to_dict())  # last: a folder with it is complete
    return info


def _check_features(n_mels: int, extra: list[np.ndarray] | None) -> np.ndarray:
    """Two random log-mels in Whisper's range (its features lie in about [-1.5, 1.5]), plus the caller's."""
    rng = np.random.default_rng(0)
    feats = [np.clip(rng.normal(0.0, 0.5, (n_mels, N_FRAMES)), -1.5, 1.5).astype(np.float32)]
    t = np.linspace(0, 1, N_FRAMES, dtype=np.float32)
    feats.append((0.8 * np.sin(40 * t)[None, :] * np.linspace(1, -1, n_mels, dtype=np.float32)[:, None]))
    for f in extra or []:
        if f.shape != (n_mels, N_FRAMES):
            raise ExportError(f"check features must be ({n_mels}, {N_FRAMES}), got {f.shape}")
        feats.append(np.asarray(f, dtype=np.float32))
    return np.stack(feats).astype(np.float32)


def check_against_torch(model: Any, folder: Path, prompt: list[int], extra: list[np.ndarray] | None = None,
                        threads: int | None = None) -> dict[str, Any]:
    """ONNX Runtime (CPU) vs torch fp32.

    Encoder: every check input as one batch and the first alone. Decoder: from torch's
    encoder states (so encoder error does not leak in), the prompt through decoder_init,
    then FORCED_STEPS fixed tokens one by one through decoder_with_past, batch of all
    inputs; each position's logits against one teacher-forced torch pass (no cache).
    """
    torch = require("torch", "build")
    from ...runtime.whisper import WhisperONNX

    features = _check_features(int(model.config.num_mel_bins), extra)
    rng = np.random.default_rng(1)
    forced = [int(t) for t in rng.integers(0, min(int(model.config.eos_token_id or 50256), model.config.vocab_size),
                                           FORCED_STEPS)]
    ids = np.asarray([prompt + forced] * len(features), dtype=np.int64)
    with torch.no_grad():
        states = model.model.encoder(torch.from_numpy(features)).last_hidden_state
        want_logits = model(encoder_outputs=(states,), decoder_input_ids=torch.from_numpy(ids)).logits.numpy()
        exact = copy.deepcopy(model.model.encoder).double()(torch.from_numpy(features).double()).last_hidden_state
    want_states = states.numpy()
    exact_states = exact.numpy()
    # torch's own fp32 rounding on this model: the floor under any fp32 implementation's difference
    fp32_rounding = float(np.abs(want_states - exact_states).max() / max(float(np.abs(exact_states).max()), 1e-12))

    runner = WhisperONNX.load(folder, providers=["CPUExecutionProvider"], threads=threads)
    try:
        got_states = runner.encoder.run([ENCODER_OUT], {FEATURES: features})[0]
        single = runner.encoder.run([ENCODER_OUT], {FEATURES: features[:1]})[0]
        out = runner.decoder_init.run(None, {IDS: ids[:, :len(prompt)], ENCODER_STATES: want_states})
        steps = [out[0]]
        feed = dict(zip(past_names(runner.layers), out[1:], strict=True))
        for t in range(len(prompt), ids.shape[1]):
            feed[IDS] = ids[:, t:t + 1]
            out = runner.decoder_with_past.run(None, feed)
            steps.append(out[0])
            for name, value in zip(present_names(runner.layers, cross=False), out[1:], strict=True):
                feed[name.replace("present.", "past_key_values.", 1)] = value
    finally:
        runner.close()
    if got_states.shape != want_states.shape:
        raise ExportError(f"ONNX encoder output shape {got_states.shape} differs from torch's {want_states.shape}")
    got_states = np.concatenate([got_states, single])
    ref_states = np.concatenate([want_states, want_states[:1]])
    got_logits = np.concatenate(steps, axis=1)
    if got_logits.shape != want_logits.shape:
        raise ExportError(f"ONNX logits shape {got_logits.shape} differs from torch's {want_logits.shape}")

    def diffs(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
        d = np.abs(got - want)
        return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
                "max_rel_diff": float(d.max() / max(float(np.abs(want).max()), 1e-12))}

    n_prompt = len(prompt)
    per_step = [diffs(got_logits[:, n_prompt + k], want_logits[:, n_prompt + k])["max_abs_diff"]
                for k in range(FORCED_STEPS)]
    top1 = got_logits.argmax(-1) == want_logits.argmax(-1)
    cos = _cosine(got_states.reshape(-1, got_states.shape[-1]), ref_states.reshape(-1, ref_states.shape[-1]))
    return {
        "inputs": int(features.shape[0]),
        "encoder": {**diffs(got_states, ref_states), "min_cosine": float(cos.min()),
                    "fp32_rounding_rel": fp32_rounding},
        "decoder": {
            **diffs(got_logits, want_logits),
            "prompt": list(prompt), "forced_tokens": forced,
            "first_step_max_abs_diff": diffs(got_logits[:, :n_prompt], want_logits[:, :n_prompt])["max_abs_diff"],
            "with_past_max_abs_diff": per_step,
            "top1_agreement": float(top1.mean()),
        },
    }
