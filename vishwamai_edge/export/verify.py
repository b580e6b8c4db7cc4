"""Check an exported GGUF against the torch model it came from.

Both get the same token ids (from the HF tokenizer), so logit differences are
numerics only; tokenization is compared separately, prompt by prompt, and on the
model's chat template rendered for a short conversation: that is where the chat
markers (special tokens) appear, which plain prompts never show.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import quiet_transformers, require


@dataclass
class LogitCheck:
    prompts: int
    max_abs_diff: float  # over all prompts and the whole vocabulary, last position
    mean_abs_diff: float
    top1_agreement: float  # fraction of prompts whose argmax token agrees
    tokenizer_agreement: float  # fraction of prompts (and the rendered chat) llama.cpp tokenizes as HF

    def to_dict(self) -> dict[str, float]:
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


class TorchReference:
    """The HF model in fp32 and its tokenizer; reference logits are computed once per prompt."""

    def __init__(self, hf_dir: Path):
        torch = require("torch", "build")
        transformers = quiet_transformers()
        self.torch = torch
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        self.model.eval()
        self._cache: dict[str, np.ndarray] = {}

    def token_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def chat_token_ids(self, rendered: str) -> list[int]:
        """What apply_chat_template(tokenize=True) gives: the template writes its own BOS."""
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def last_logits(self, prompt: str) -> np.ndarray:
        if prompt not in self._cache:
            ids = self.torch.tensor([self.token_ids(prompt)])
            with self.torch.no_grad():
                self._cache[prompt] = self.model(input_ids=ids).logits[0, -1].float().numpy()
        return self._cache[prompt]


def check_gguf(reference: TorchReference, gguf_path: Path, prompts: list[str], n_threads: int | None = None) -> LogitCheck:
    from ..runtime.backends import TokenSegment
    from ..runtime.backends.llamacpp import LlamaCppBackend

    chat = chat_check_prompt(reference.tokenizer)
    backend = LlamaCppBackend.load(gguf_path, n_ctx=512, n_threads=n_threads)
    diffs, means, top1, tok_same = [], [], 0, 0
    try:
        for prompt in prompts:
            ids = reference.token_ids(prompt)
            tok_same += backend.tokenize(prompt, add_special=True, parse_special=True) == ids
            backend.prefill([TokenSegment(ids)])
            got = backend.logits()
            want = reference.last_logits(prompt)
            n = min(len(got), len(want))  # GGUF vocab may be padded past the tokenizer
            d = np.abs(got[:n] - want[:n])
            diffs.append(float(d.max()))
            means.append(float(d.mean()))
            top1 += int(np.argmax(got[:n]) == np.argmax(want[:n]))
        if chat is not None:
            got_ids = backend.tokenize(chat, add_special=False, parse_special=True)
            tok_same += got_ids == reference.chat_token_ids(chat)
    finally:
        backend.close()
    k = len(prompts)
    return LogitCheck(k, max(diffs), float(np.mean(means)), top1 / k, tok_same / (k + (chat is not None)))
