"""LLaVA-style folders (`LlavaForConditionalGeneration`, the llava-hf layout): the parts each export reads.

A LLaVA checkpoint is a vision tower, a projector and a plain causal LM in one folder.
The vision side goes to ONNX (`export.onnx`) and to an mmproj GGUF; the language model is
split out here into an ordinary HF folder (config, safetensors, tokenizer, chat template),
which the GGUF exporter and its torch check then treat like any other LLM.

Weights are renamed shard by shard, never all in memory (a 7B model is 14 GB in fp16).
Both layouts transformers writes are read: `language_model.model.X` /
`language_model.lm_head.weight` (llava-hf on the Hub, and what transformers 5 saves) and
`model.language_model.X` / `lm_head.weight` (transformers 5's in-memory names).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError, SourceError

LLAVA_ARCHITECTURES = ("LlavaForConditionalGeneration",)
# the causal-LM class of each text model type the GGUF exporter carries
CAUSAL_LM = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "gemma": "GemmaForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
             ("model.language_model.", "model."), ("lm_head.", "lm_head."))


@dataclass(frozen=True)
class ImageToken:
    """The placeholder the chat template writes for an image, and its token id."""

    text: str
    id: int

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "id": self.id}


def read_config(hf_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(hf_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"{hf_dir}/config.json cannot be read ({exc})") from None


def is_llava(hf_dir: Path) -> bool:
    config = read_config(hf_dir)
    return any(a in LLAVA_ARCHITECTURES for a in config.get("architectures") or [])


def chat_template(hf_dir: Path) -> str | None:
    """The template that renders image parts: the processor's (chat_template.jinja/.json), else the tokenizer's."""
    hf_dir = Path(hf_dir)
    if (hf_dir / "chat_template.jinja").is_file():
        return (hf_dir / "chat_template.jinja").read_text()
    for name, key in (("chat_template.json", "chat_template"), ("processor_config.json", "chat_template"),
                      ("tokenizer_config.json", "chat_template")):
        f = hf_dir / name
        if f.is_file():
            value = json.loads(f.read_text()).get(key)
            if isinstance(value, str) and value:
                return value
    return None


def image_token(hf_dir: Path) -> ImageToken:
    """`image_token_index` and its text in the tokenizer's added tokens."""
    hf_dir = Path(hf_dir)
    config = read_config(hf_dir)
    token_id = config.get("image_token_index", config.get("image_token_id"))
    if not isinstance(token_id, int):
        raise SourceError(f"{hf_dir}/config.json has no image_token_index")
    for item in _added_tokens(hf_dir):
        if item["id"] == token_id:
            return ImageToken(item["content"], token_id)
    raise SourceError(f"{hf_dir}: the tokenizer has no added token with the image_token_index {token_id}")


def _added_tokens(hf_dir: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if (hf_dir / "tokenizer.json").is_file():
        out += json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", [])
    if (hf_dir / "tokenizer_config.json").is_file():
        decoder = json.loads((hf_dir / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})
        out += [{"id": int(i), "content": t["content"]} for i, t in decoder.items()]
    if (hf_dir / "added_tokens.json").is_file():
        out += [{"id": i, "content": t} for t, i in json.loads((hf_dir / "added_tokens.json").read_text()).items()]
    return out


def _rename(key: str) -> str | None:
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return None  # vision tower / projector


def text_config(config: dict[str, Any], where: Path) -> dict[str, Any]:
    text = dict(config.get("text_config") or {})
    model_type = text.get("model_type", "llama")
    if model_type not in CAUSAL_LM:
        raise ExportError(f"{where}: the language model is {model_type!r}; the GGUF exporter carries "
                          f"{', '.join(CAUSAL_LM)}")
    text["model_type"] = model_type
    text["architectures"] = [CAUSAL_LM[model_type]]
    text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
    return text


def split_language_model(hf_dir: Path, out_dir: Path) -> Path:
    """Write the language model of a LLaVA folder as a plain causal-LM HF folder into `out_dir`
    (which the caller makes atomic); the chat template goes with the tokenizer."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config = read_config(hf_dir)
    (out_dir / "config.json").write_text(json.dumps(text_config(config, hf_dir), indent=2))
    shards = sorted(hf_dir.glob("*.safetensors"))
    if not shards:
        raise SourceError(f"{hf_dir} has no *.safetensors weights")
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        tensors = {}
        # numpy cannot hold bf16: read through torch, which keeps every dtype
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                new = _rename(key)
                if new is not None:
                    tensors[new] = f.get_tensor(key)
        if not tensors:
            continue
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    if not any(k.startswith("model.embed_tokens") for k in weight_map):
        raise SourceError(f"{hf_dir}: no language-model weights found (language_model.* or model.language_model.*)")
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out_dir / name)
    template = chat_template(hf_dir)
    if template is not None:  # where both transformers and gguf-py's SpecialVocab read it
        tc_path = out_dir / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
        tc["chat_template"] = template
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False))
    if (hf_dir / "generation_config.json").is_file():
        shutil.copy2(hf_dir / "generation_config.json", out_dir / "generation_config.json")
    return out_dir

