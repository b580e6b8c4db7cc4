"""Whisper speech-to-text on the device: three ONNX Runtime sessions and a greedy loop over a KV cache.

The folder `export.onnx.whisper.export_whisper` writes:
  encoder.onnx            input_features (batch, n_mels, 3000) -> last_hidden_state (batch, 1500, d_model)
  decoder_init.onnx       input_ids (batch, seq), encoder_hidden_states
                          -> logits (batch, seq, vocab), present.{i}.decoder.{key,value} (batch, heads, seq, head_dim),
                             present.{i}.encoder.{key,value} (batch, heads, 1500, head_dim)
  decoder_with_past.onnx  input_ids (batch, 1), past_key_values.{i}.decoder.{key,value} (batch, heads, past, head_dim),
                          past_key_values.{i}.encoder.{key,value}
                          -> logits (batch, 1, vocab), present.{i}.decoder.{key,value} (batch, heads, past + 1, head_dim)
  tokenizer.json, generation_config.json (the checkpoint's own), whisper.json (the export's description)
All I/O is float32 (int64 ids) whatever the dtype inside the graphs. The cross-attention
keys and values are computed once, by decoder_init, and fed back unchanged.

Decoding follows transformers 5's `WhisperForConditionalGeneration.generate` for one
30 s window without timestamps (models/whisper/generation_whisper.py,
`_retrieve_init_tokens` and `_retrieve_logit_processors`):
  prompt  decoder_start_token_id, then for a multilingual model <|lang|> and the task
          token (transcribe unless asked), for an English-only one the forced_decoder_ids
          in order; then no_timestamps_token_id unless already last.
          tiny.en: <|startoftranscript|><|notimestamps|>;
          multilingual: <|startoftranscript|><|en|><|transcribe|><|notimestamps|>.
  logits  suppress_tokens at every step, begin_suppress_tokens at the first generated one.
  stop    eos_token_id (<|endoftext|>), or the sequence reaching generation_config.max_length
          + len(prompt) tokens, prompt included, capped at max_target_positions (448), as
          `_set_max_new_tokens_and_length` sets it; with max_new_tokens, prompt + max_new_tokens.
Text is the generated ids decoded by `tokenizers` with special tokens skipped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError, InputError, require
from .onnx_session import Provider, ort_session

ENCODER, DECODER_INIT, DECODER_WITH_PAST = "encoder.onnx", "decoder_init.onnx", "decoder_with_past.onnx"
TOKENIZER, GENERATION_CONFIG, DESCRIPTION = "tokenizer.json", "generation_config.json", "whisper.json"
FEATURES, ENCODER_OUT = "input_features", "last_hidden_state"
IDS, ENCODER_STATES, LOGITS = "input_ids", "encoder_hidden_states", "logits"
N_FRAMES = 3000  # 30 s of 10 ms mel frames: the only input length Whisper's encoder takes


def present_names(layers: int, cross: bool) -> list[str]:
    """Output names of decoder_init (cross=True) or decoder_with_past (cross=False), after `logits`."""
    kinds = ("decoder", "encoder") if cross else ("decoder",)
    return [f"present.{i}.{k}.{w}" for i in range(layers) for k in kinds for w in ("key", "value")]


def past_names(layers: int) -> list[str]:
    """decoder_with_past's inputs after `input_ids`."""
    return [f"past_key_values.{i}.{k}.{w}" for i in range(layers) for k in ("decoder", "encoder")
            for w in ("key", "value")]


@dataclass
class DecodingSpec:
    """What greedy decoding needs from generation_config.json, resolved once."""

    prompt: list[int]
    eos: int
    suppress: list[int]
    begin_suppress: list[int]
    max_length: int

    @classmethod
    def from_generation_config(cls, gen: dict[str, Any], max_target_positions: int = 448,
                               language: str | None = None, task: str | None = None) -> DecodingSpec:
        """The prompt and rules `generate` uses with `language` / `task` (timestamps off).

        A multilingual model with no `language` is given English: this runtime does not
        detect languages (generate would, with one extra decoder pass).
        """
        try:
            start = int(gen["decoder_start_token_id"])
            eos = gen["eos_token_id"]
            eos = int(eos[0] if isinstance(eos, list) else eos)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(f"{GENERATION_CONFIG} lacks decoder_start_token_id / eos_token_id ({exc})") from None
        lang_to_id: dict[str, int] = gen.get("lang_to_id") or {}
        task_to_id: dict[str, int] = gen.get("task_to_id") or {}
        multilingual = bool(gen.get("is_multilingual", bool(lang_to_id)))
        if (language or task) and not multilingual:
            raise InputError("this Whisper model is English-only: it takes no language or task")
        prompt = [start]
        if multilingual:
            code = (language or "en").lower().strip("<|>")
            token = f"<|{code}|>"
            if token not in lang_to_id:
                raise InputError(f"language {code!r} is not in this model's lang_to_id "
                                 f"({', '.join(sorted(lang_to_id))[:200]})")
            prompt.append(int(lang_to_id[token]))
            task = task or "transcribe"
            if task not in task_to_id:
                raise InputError(f"task {task!r} is not one of this model's: {', '.join(sorted(task_to_id))}")
            prompt.append(int(task_to_id[task]))
        else:
            # forced_decoder_ids [[1, id1], [2, id2], ...]: positions after the start token, in order
            forced = sorted((int(p), t) for p, t in (gen.get("forced_decoder_ids") or []))
            for i, (pos, tok) in enumerate(forced, start=1):
                if pos != i:
                    raise BundleError(f"{GENERATION_CONFIG}: forced_decoder_ids {forced} skip position {i}")
                if tok is not None:
                    prompt.append(int(tok))
        no_ts = gen.get("no_timestamps_token_id")
        if no_ts is not None and prompt[-1] != int(no_ts):
            prompt.append(int(no_ts))
        # generate's _set_max_new_tokens_and_length: max_length counts the prompt only beyond
        # max_target_positions // 2 - 1 tokens, and the whole sequence stays within max_target_positions
        initial = min(max_target_positions // 2 - 1, len(prompt))
        max_length = min(int(gen.get("max_length") or max_target_positions) + initial, max_target_positions)
        return cls(prompt=prompt, eos=eos, suppress=[int(t) for t in gen.get("suppress_tokens") or []],
                   begin_suppress=[int(t) for t in gen.get("begin_suppress_tokens") or []], max_length=max_length)


def _session(path: Path, providers: Sequence[Provider] | None, threads: int | None) -> Any:
    return ort_session(path, providers, threads, "Whisper graph")


class WhisperONNX:
    """A Whisper export folder in ONNX Runtime: log-mel features in, text out."""

    def __init__(self, folder: Path, encoder: Any, decoder_init: Any, decoder_with_past: Any,
                 generation_config: dict[str, Any], tokenizer: Any | None, description: dict[str, Any]):
        self.folder = folder
        self.encoder, self.decoder_init, self.decoder_with_past = encoder, decoder_init, decoder_with_past
        self.generation_config = generation_config
        self.tokenizer = tokenizer
        self.description = description
        self.providers: list[str] = list(encoder.get_providers())
        self.layers = sum(1 for i in decoder_with_past.get_inputs() if i.name.endswith(".decoder.key"))
        want = {IDS, *past_names(self.layers)}
        have = {i.name for i in decoder_with_past.get_inputs()}
        if not self.layers or have != want:
            raise BundleError(f"{folder / DECODER_WITH_PAST} is not a Whisper decoder_with_past graph "
                              f"(inputs {sorted(have)[:6]}...)")
        self.n_mels = int(description.get("n_mels") or encoder.get_inputs()[0].shape[1])
        self.max_target_positions = int(description.get("max_target_positions", 448))

    @classmethod
    def load(cls, folder: Path | str, providers: Sequence[Provider] | None = None,
             threads: int | None = None) -> WhisperONNX:
        folder = Path(folder)
        for name in (ENCODER, DECODER_INIT, DECODER_WITH_PAST, GENERATION_CONFIG):
            if not (folder / name).is_file():
                raise BundleError(f"{folder} is not a Whisper ONNX folder: {name} is missing")
        try:
            gen = json.loads((folder / GENERATION_CONFIG).read_text())
            description = json.loads((folder / DESCRIPTION).read_text()) if (folder / DESCRIPTION).is_file() else {}
        except json.JSONDecodeError as exc:
            raise BundleError(f"{folder}: a JSON file is damaged ({exc})") from None
        tokenizer = None
        if (folder / TOKENIZER).is_file():
            tokenizers = require("tokenizers", "runtime")
            tokenizer = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER))
        return cls(folder, _session(folder / ENCODER, providers, threads),
                   _session(folder / DECODER_INIT, providers, threads),
                   _session(folder / DECODER_WITH_PAST, providers, threads), gen, tokenizer, description)

    def decoding(self, language: str | None = None, task: str | None = None) -> DecodingSpec:
        return DecodingSpec.from_generation_config(self.generation_config, self.max_target_positions,
                                                   language, task)

    def encode(self, features: np.ndarray) -> np.ndarray:
        """(n_mels, 3000) or (batch, n_mels, 3000) log-mel -> (batch, 1500, d_model)."""
        x = np.asarray(features, dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[1:] != (self.n_mels, N_FRAMES):
            raise InputError(f"Whisper features must be ({self.n_mels}, {N_FRAMES}), got shape {x.shape}")
        return self.encoder.run([ENCODER_OUT], {FEATURES: np.ascontiguousarray(x)})[0]

    def generate(self, features: np.ndarray, language: str | None = None, task: str | None = None,
                 max_new_tokens: int | None = None) -> list[int]:
        """Greedy ids after the prompt (the end-of-text token not included), for one window."""
        spec = self.decoding(language, task)
        limit = spec.max_length if max_new_tokens is None else min(spec.max_length,
                                                                   len(spec.prompt) + max_new_tokens)
        states = self.encode(features)
        if states.shape[0] != 1:
            raise InputError("generate takes one window of features at a time")
        suppress = np.asarray(spec.suppress, dtype=np.int64)
        begin_suppress = np.asarray(spec.begin_suppress, dtype=np.int64)
        out = self.decoder_init.run(None, {IDS: np.asarray([spec.prompt], dtype=np.int64),
                                           ENCODER_STATES: states})
        logits, present = out[0][0, -1], out[1:]
        # decoder_init gives, per layer, self k, self v, cross k, cross v: past_names' order exactly
        feed = dict(zip(past_names(self.layers), present, strict=True))
        self_names = present_names(self.layers, cross=False)
        tokens: list[int] = []
        length = len(spec.prompt)
        while length < limit:
            scores = logits.astype(np.float32, copy=True)
            if suppress.size:
                scores[suppress] = -np.inf
            if not tokens and begin_suppress.size:
                scores[begin_suppress] = -np.inf
            token = int(np.argmax(scores))
            if token == spec.eos:
                break
            tokens.append(token)
            length += 1
            if length >= limit:
                break
            feed[IDS] = np.asarray([[token]], dtype=np.int64)
            out = self.decoder_with_past.run(None, feed)
            logits = out[0][0, -1]
            for name, value in zip(self_names, out[1:], strict=True):
                feed[name.replace("present.", "past_key_values.", 1)] = value
        return tokens

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise BundleError(f"{self.folder} has no {TOKENIZER}: ids cannot become text")
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def transcribe(self, features: np.ndarray, language: str | None = None, task: str | None = None,
                   max_new_tokens: int | None = None) -> str:
        """(n_mels, 3000) log-mel features of one 30 s window -> its text (greedy, no timestamps)."""
        return self.decode(self.generate(features, language, task, max_new_tokens))

    def close(self) -> None:
        self.encoder = self.decoder_init = self.decoder_with_past = None
