"""Knowledge distillation: the student learns the teacher's token distributions (the SFT loop, another loss).

    teacher -> any source the recipe accepts, loaded frozen beside the student; it must share the student's
               vocabulary (the distributions are compared token by token), else a one-line error
    data    -> a text or chat dataset, encoded as fine-tuning encodes it; the distribution is matched at the
               positions fine-tuning would train (all tokens of text, the assistant's of chats)
    on-policy -> with `on_policy` p, a step's sequences are, with probability p (drawn from the seed and step),
               the student's own sampled continuations of the examples' prompts (GKD, Agarwal et al. 2024):
               the student learns from the teacher where its own mistakes lead
    loss    -> per token, with both distributions at `temperature`:
               forward_kl  KL(teacher || student), mode-covering, the classic choice (Hinton et al.)
               reverse_kl  KL(student || teacher), mode-seeking
               jsd         beta KL(teacher || m) + (1 - beta) KL(student || m), m = beta teacher + (1 - beta) student
               summed over the step's tokens and divided by their number, as the SFT loss is

The loop, its checkpoints, exact resume and several GPUs are the SFT loop's (train/finetune.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import quiet_transformers, require
from ..recipe import DistillSpec
from . import data as D
from .lora import FinetuneError


def divergence(student_logits, teacher_logits, spec: DistillSpec):
    """Per position, the divergence of the student's distribution from the teacher's (nats)."""
    torch = require("torch", "build")
    n = min(student_logits.shape[-1], teacher_logits.shape[-1])  # a padded vocabulary's extra rows never occur
    s = torch.log_softmax(student_logits[..., :n].float() / spec.temperature, dim=-1)
    t = torch.log_softmax(teacher_logits[..., :n].float() / spec.temperature, dim=-1)
    if spec.loss == "forward_kl":
        return (t.exp() * (t - s)).sum(-1)
    if spec.loss == "reverse_kl":
        return (s.exp() * (s - t)).sum(-1)
    b = spec.beta
    m = torch.logsumexp(torch.stack([t + math.log(b), s + math.log(1 - b)]), dim=0)
    return b * (t.exp() * (t - m)).sum(-1) + (1 - b) * (s.exp() * (s - m)).sum(-1)


def check_vocabulary(student_tokenizer, teacher_tokenizer, teacher_dir: Path, where: str) -> None:
    mine, theirs = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if mine != theirs:
        differ = len(set(mine.items()) ^ set(theirs.items()))
        raise FinetuneError(
            f"{where}: finetune.distill.teacher: {teacher_dir} has another vocabulary than the student "
            f"({len(theirs):,} tokens against {len(mine):,}, {differ:,} entries differ); distillation compares the "
            "two token by token, so the teacher must use the student's tokenizer")


def load_teacher(teacher_dir: Path, student_tokenizer, device, dtype, where: str):
    """The teacher on `device`, frozen, in the student's dtype; its vocabulary checked first."""
    transformers = quiet_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir, trust_remote_code=False)
    check_vocabulary(student_tokenizer, tokenizer, teacher_dir, where)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@dataclass
class Distillation:
    """The distillation objective of the SFT loop: `prepare` swaps a step's examples for the student's own
    continuations on an on-policy step, `loss_sum` is the summed divergence over the trained positions."""

    spec: DistillSpec
    teacher: Any
    seed: int
    pad_id: int
    stop_ids: set[int]
    max_seq_len: int

    def on_policy_step(self, step: int) -> bool:
        return self.spec.on_policy > 0 and random.Random(self.seed * 1_000_033 + step).random() < self.spec.on_policy

    def prepare(self, step: int, examples: list[D.Example], model, device) -> list[D.Example]:
        if not self.on_policy_step(step):
            return examples
        from .sampling import generate

        prompts = [prompt_of(ex, self.max_seq_len) for ex in examples]
        room = [max(1, min(self.spec.max_new_tokens, self.max_seq_len - len(p))) for p in prompts]
        was_training = model.training
        model.eval()
        completions = generate(model, prompts, max(room), self.pad_id, self.stop_ids, 1.0, device)
        model.train(was_training)
        return [D.Example(p + c[:r], [D.IGNORE] * len(p) + c[:r]) for p, c, r in zip(prompts, completions, room)]

    def loss_sum(self, model, batch: dict[str, Any], device, dtype):
        torch = require("torch", "build")
        labels = batch.pop("labels").to(device)
        inputs = {k: v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
        trained = labels[:, 1:] != D.IGNORE
        student = model(**inputs, use_cache=False).logits[:, :-1][trained]
        with torch.no_grad():
            teacher = self.teacher(**inputs, use_cache=False).logits[:, :-1][trained]
        return divergence(student, teacher, self.spec).sum()


def prompt_of(ex: D.Example, max_seq_len: int) -> list[int]:
    """What the student continues on an on-policy step: a chat up to its first trained (assistant) token, a text
    block's first half."""
    first = next((i for i, x in enumerate(ex.labels) if x != D.IGNORE), len(ex.labels))
    if first == 0:  # raw text: every token is trained
        return ex.input_ids[: max(1, min(len(ex.input_ids), max_seq_len) // 2)]
    return ex.input_ids[:first]
