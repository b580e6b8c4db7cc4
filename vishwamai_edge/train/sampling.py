"""Sampling from the model being trained (GRPO's groups, on-policy distillation): left-padded prompts, one
completion each, cut after the first token that ends a turn."""

from __future__ import annotations

from ..errors import require


def generate(model, prompts: list[list[int]], max_new: int, pad_id: int, stop_ids: set[int],
             temperature: float | None, device) -> list[list[int]]:
    """A completion per prompt (sampled at `temperature`, greedy when None), cut after its first stop token."""
    torch = require("torch", "build")
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)  # left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {
        "do_sample": False}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, pad_token_id=pad_id,
                             eos_token_id=sorted(stop_ids), use_cache=True, **sampling)
    completions = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        completions.append(row[:cut])
    return completions


def turn_end_ids(model, tokenizer) -> set[int]:
    """The tokens that end a turn: the generation config's end tokens and the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids

