"""Where weights come from, resolved to the one input the export stages read: an HF folder (config.json,
safetensors, tokenizer, chat template). An HF folder as it is (`folders`), a local GGUF dequantized once
(`gguf`), the embedded defaults (`embedded`), a Hub repository (`hub`), a GGUF bundled as it is (`as_is`),
Whisper in CTranslate2's format (`whisper_ct2`), and the one safe reader of pickled checkpoints (`pickles`).
"""
