"""Importance matrix for llama.cpp's quantizer, computed with torch on calibration text.

For every linear layer, the mean square of each input column over the
calibration tokens (what llama.cpp's imatrix tool records). The quantizer uses
it to spend precision where activations are large. Small models need it: without
it, SmolLM2-135M at 4-5 bits stops answering simple questions correctly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import require

# Mixed text and chat turns in the formats the models will see; kept short so the
# pass costs seconds on a CPU.
CALIBRATION_TEXT = [
    "The capital of France is Paris. Berlin is the capital of Germany, and Rome is the capital of Italy.",
    "Water boils at 100 degrees Celsius at sea level. The Earth orbits the Sun once every 365.25 days.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Q: How many legs does a spider have?\nA: A spider has eight legs.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the chloroplasts.",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong and Buzz Aldrin walked on its surface.",
    "Les élèves étudient la photosynthèse. Der Bäcker backt Brot. 光合作用。 Привет, мир!",
    "To reset the device, hold the power button for ten seconds, then release it and wait for the light.",
    "Shakespeare wrote Hamlet, Macbeth and Romeo and Juliet. Tolstoy wrote War and Peace.",
    "A list: 1. apples, 2. bananas, 3. cherries. Total cost: $4.75, paid on 2024-03-15 at 14:30.",
]
CALIBRATION_CHATS = [
    [{"role": "user", "content": "What is the capital of Japan?"},
     {"role": "assistant", "content": "The capital of Japan is Tokyo."}],
    [{"role": "user", "content": "Give me a short tip for better sleep."},
     {"role": "assistant", "content": "Keep a regular schedule and avoid screens an hour before bed."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."},
     {"role": "assistant", "content": "'Good morning' in Spanish is 'buenos días'."}],
    [{"role": "user", "content": "What is 12 times 7?"}, {"role": "assistant", "content": "12 times 7 is 84."}],
]


def calibration_samples(tokenizer) -> list[list[int]]:
    samples = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in CALIBRATION_TEXT]
    if getattr(tokenizer, "chat_template", None):
        for chat in CALIBRATION_CHATS:
            ids = tokenizer.apply_chat_template(chat, tokenize=True)
            samples.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return samples


def compute_imatrix(model, tokenizer, gguf_name) -> dict[str, np.ndarray]:
    """Run the calibration set through `model`; key the result by GGUF tensor name.

    `gguf_name(hf_param_name)` maps an HF weight name to its GGUF name (or None to skip).
    """
    torch = require("torch", "build")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        name = gguf_name(f"{module_name}.weight")
        if name is None or name in ("output.weight", "token_embd.weight"):
            continue  # the output matrix is quantized to Q6_K/Q8_0, which take no imatrix

        def hook(_mod, inputs, _out, name=name):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for ids in calibration_samples(tokenizer):
                model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).numpy().astype(np.float32) for name in sums}


def imatrix_for(hf_dir: Path, model, tokenizer) -> dict[str, np.ndarray]:
    """The importance matrix of an HF folder's model, named as its GGUF tensors."""
    from .gguf.base import converter_for

    converter = converter_for(hf_dir)
    return compute_imatrix(model, tokenizer, converter.gguf_name)
