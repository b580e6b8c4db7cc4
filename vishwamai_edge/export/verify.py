"""Check an exported GGUF against the torch model it came from.

Both get the same token ids, so logit differences are numerics only; tokenization
is compared separately, prompt by prompt, and on the model's chat template rendered
for a short conversation: that is where the chat markers (special tokens) appear,
which plain prompts never show.

The reference tokenization is the HF tokenizer, except for a SentencePiece-only
folder (tokenizer.model, no tokenizer.json): transformers then builds a tokenizer of
its own from the SentencePiece model which does not always tokenize as SentencePiece
does (runs of spaces, a leading space), while llama.cpp follows SentencePiece. There
the reference is SentencePiece itself, applied as llama.cpp applies it; where the HF
tokenizer disagrees with it, that is recorded (hf_tokenizer_agreement), not failed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import quiet_transformers, require


@dataclass
class LogitCheck:
    prompts: int
    max_abs_diff: float  # over all prompts and the whole vocabulary, last position
    mean_abs_diff: float
    top1_agreement: float  # fraction of prompts whose argmax token agrees
    # fraction of prompts (and the rendered chat) llama.cpp tokenizes as the reference tokenization
    tokenizer_agreement: float
    tokenizer_kind: str = "bpe"  # "bpe" (byte-level BPE) or "sentencepiece"
    tokenizer_reference: str = "hf"  # "hf" (the HF tokenizer) or "sentencepiece" (tokenizer.model itself)
    # with a SentencePiece reference: the fraction of the same texts the HF tokenizer tokenizes
    # as SentencePiece does (information only, never failed)
    hf_tokenizer_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


# A short conversation rendered with the model's chat template for the tokenizer check.
CHAT_CHECK_MESSAGES = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris. It has 2,1 million inhabitants."},
    {"role": "user", "content": "And of Germany?"},
]


def chat_check_prompt(tokenizer) -> str | None:
    """CHAT_CHECK_MESSAGES rendered by the HF tokenizer's chat template; None without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.apply_chat_template(CHAT_CHECK_MESSAGES, tokenize=False, add_generation_prompt=True)


def is_sentencepiece_only(hf_dir: Path) -> bool:
    return (hf_dir / "tokenizer.model").is_file() and not (hf_dir / "tokenizer.json").is_file()


def tokenizer_kind(hf_dir: Path) -> str:
    """"sentencepiece" (tokenizer.model, or tokenizer.json with byte fallback) or "bpe" (byte-level BPE)."""
    if (hf_dir / "tokenizer.model").is_file():
        return "sentencepiece"
    path = hf_dir / "tokenizer.json"
    if path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("model", {}).get("byte_fallback"):
        return "sentencepiece"
    return "bpe"


def space_after_special(hf_dir: Path, **load: Any) -> bool:
    """Whether the model's own tokenizer, loaded from `hf_dir` as the model's own code loads it (`load`:
    VILA's loader asks for use_fast=False, legacy=False), starts the text after a control token with
    SentencePiece's word-start mark, as llama.cpp does. Asked of the tokenizer itself: `legacy` in
    tokenizer_config.json decides for a slow tokenizer, the normalizer in tokenizer.json for a fast one.
    Byte-level BPE vocabularies have no such mark."""
    if tokenizer_kind(hf_dir) != "sentencepiece":
        return True
    transformers = quiet_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False, **load)
    control = tokenizer.eos_token or tokenizer.bos_token
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(f"{control}a", add_special_tokens=False)["input_ids"])
    return len(pieces) < 2 or pieces[1].startswith("\u2581")


class SentencePieceReference:
    """tokenizer.model tokenizing text the way llama.cpp's SPM vocabulary does.

    llama.cpp (src/llama-vocab.cpp, `tokenize`, LLAMA_VOCAB_TYPE_SPM, and
    `tokenizer_st_partition`) first splits the text at every CONTROL, USER_DEFINED and
    UNKNOWN token, longest token text first, then encodes each remaining piece of text
    on its own, with a space prefixed (add_space_prefix, SentencePiece's dummy prefix)
    at the start of the text and after every special token. Pieces of text are always
    separated by special tokens, so that is SentencePiece's own encoding of each piece.
    BOS (EOS) is added when add_special and the tokenizer adds it.
    """

    def __init__(self, hf_dir: Path):
        from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

        self.sp = SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        specials: dict[str, int] = {}
        for i, piece in enumerate(proto.pieces):
            if self.sp.is_control(i) or self.sp.is_unknown(i) or piece.type == user_defined:
                specials[piece.piece] = i
        config = _json(hf_dir / "tokenizer_config.json")
        for i, item in (config.get("added_tokens_decoder") or {}).items():
            specials[item["content"]] = int(i)
        specials.update(_json(hf_dir / "added_tokens.json"))
        specials.pop("", None)  # llama.cpp cannot match an empty text
        # longest first, as llama.cpp sorts its special-token cache
        self.specials = sorted(specials.items(), key=lambda kv: (-len(kv[0].encode("utf-8")), kv[1]))
        self.bos_id = specials.get(_token_text(config.get("bos_token")), self.sp.bos_id())
        self.eos_id = specials.get(_token_text(config.get("eos_token")), self.sp.eos_id())
        # LlamaTokenizer's defaults, which are llama.cpp's for SentencePiece vocabularies too
        self.add_bos = bool(config.get("add_bos_token", True)) and self.bos_id >= 0
        self.add_eos = bool(config.get("add_eos_token", False)) and self.eos_id >= 0

    def partition(self, text: str) -> list[str | int]:
        """The text split into pieces of text and special token ids, as llama.cpp splits it."""
        parts: list[str | int] = [text] if text else []
        for special, token in self.specials:
            out: list[str | int] = []
            for part in parts:
                if isinstance(part, int) or special not in part:
                    out.append(part)
                    continue
                for k, chunk in enumerate(part.split(special)):
                    if k:
                        out.append(token)
                    if chunk:
                        out.append(chunk)
            parts = out
        return parts

    def encode(self, text: str, add_special: bool) -> list[int]:
        ids = [self.bos_id] if add_special and self.add_bos else []
        for part in self.partition(text):
            ids.extend([part] if isinstance(part, int) else self.sp.encode(part))
        if add_special and self.add_eos:
            ids.append(self.eos_id)
        return ids


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def own_reference(hf_dir: Path) -> Any:
    """Our torch module for an architecture transformers has no class for (MiniCPM), else None."""
    from .minicpm_lm import is_minicpm_lm, load_minicpm_lm

    return load_minicpm_lm(hf_dir) if is_minicpm_lm(hf_dir) else None


class TorchReference:
    """The HF model in fp32 and its tokenizer; reference logits are computed once per prompt."""

    def __init__(self, hf_dir: Path):
        torch = require("torch", "build")
        transformers = quiet_transformers()
        self.torch = torch
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
        model = own_reference(hf_dir)
        if model is None:
            model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                              trust_remote_code=False)
        self.model = model
        self.model.eval()
        self.tokenizer_kind = tokenizer_kind(hf_dir)
        self.spm = SentencePieceReference(hf_dir) if is_sentencepiece_only(hf_dir) else None
        self._cache: dict[str, np.ndarray] = {}

    @property
    def tokenizer_reference(self) -> str:
        return "sentencepiece" if self.spm is not None else "hf"

    def hf_token_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def hf_chat_token_ids(self, rendered: str) -> list[int]:
        """What apply_chat_template(tokenize=True) gives: the template writes its own BOS."""
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def token_ids(self, prompt: str) -> list[int]:
        """The reference tokenization of a prompt, the ids both models are fed."""
        return self.spm.encode(prompt, add_special=True) if self.spm else self.hf_token_ids(prompt)

    def chat_token_ids(self, rendered: str) -> list[int]:
        return self.spm.encode(rendered, add_special=False) if self.spm else self.hf_chat_token_ids(rendered)

    def last_logits(self, prompt: str) -> np.ndarray:
        if prompt not in self._cache:
            ids = self.torch.tensor([self.token_ids(prompt)])
            with self.torch.no_grad():
                self._cache[prompt] = self.model(input_ids=ids).logits[0, -1].float().numpy()
        return self._cache[prompt]


def check_gguf(reference: TorchReference, gguf_path: Path, prompts: list[str], n_threads: int | None = None,
               adapter: tuple[Path, float] | None = None) -> LogitCheck:
    """llama.cpp on `gguf_path` (with a LoRA `adapter` (file, scale) applied) against the torch reference."""
    from ..runtime.backends import TokenSegment
    from ..runtime.backends.llamacpp import LlamaCppBackend

    chat = chat_check_prompt(reference.tokenizer)
    backend = LlamaCppBackend.load(gguf_path, n_ctx=512, n_threads=n_threads)
    if adapter is not None:
        try:
            backend.load_adapter("checked", adapter[0])
        except BaseException:
            backend.close()
            raise
        backend.use_adapter("checked", adapter[1])
    diffs, means, top1, tok_same, hf_same = [], [], 0, 0, 0
    try:
        for prompt in prompts:
            ids = reference.token_ids(prompt)
            tok_same += backend.tokenize(prompt, add_special=True, parse_special=True) == ids
            hf_same += reference.hf_token_ids(prompt) == ids
            backend.prefill([TokenSegment(ids)])
            got = backend.logits()
            want = reference.last_logits(prompt)
            n = min(len(got), len(want))  # GGUF vocab may be padded past the tokenizer
            d = np.abs(got[:n] - want[:n])
            diffs.append(float(d.max()))
            means.append(float(d.mean()))
            top1 += int(np.argmax(got[:n]) == np.argmax(want[:n]))
        if chat is not None:
            ids = reference.chat_token_ids(chat)
            tok_same += backend.tokenize(chat, add_special=False, parse_special=True) == ids
            hf_same += reference.hf_chat_token_ids(chat) == ids
    finally:
        backend.close()
    k = len(prompts)
    texts = k + (chat is not None)
    return LogitCheck(
        k, max(diffs), float(np.mean(means)), top1 / k, tok_same / texts,
        tokenizer_kind=reference.tokenizer_kind, tokenizer_reference=reference.tokenizer_reference,
        hf_tokenizer_agreement=hf_same / texts if reference.spm is not None else None,
    )
