"""GRPO: group-relative policy optimisation with verifiable rewards, on LoRA adapters. One readable loop.

    data    -> JSONL of `prompt` (a user message, or a list of chat messages) and answer columns, or the
               drawn arithmetic task; each prompt rendered by the model's chat template
    sample  -> per step, `batch_size` prompts, `num_generations` completions each (temperature, up to
               `max_completion_tokens`, ending at the end-of-turn token)
    reward  -> each completion scored by the recipe's rewards (train/rewards.py), every part logged apart;
               a completion's advantage is its total's distance from its group's mean, in the group's
               standard deviations (a group whose completions all score alike teaches nothing)
    loss    -> PPO's clipped objective per completion token, min(r A, clip(r, 1 - eps, 1 + eps) A) with r the
               probability ratio against the policy that sampled it, plus `beta` times the KL estimate
               exp(ref - logp) - (ref - logp) - 1 against the starting model (the adapters switched off);
               summed over all completion tokens of the step and divided by their number
    output  -> <out>/checkpoints/step-N/ every `save_every` steps, <out>/adapter/ at the end, with the
               held-out accuracy (greedy) before and after

Why not TRL's GRPOTrainer: it resumes through the HF Trainer, whose checkpoints this project does not
write (nor unpickle), and its resumed runs do not repeat the sampling; here, as in the SFT loop, the
prompts and every random draw of step s are a function of (seed, s), so a resumed run gives the weights of
an uninterrupted one. One process: the generations of several GPUs are not gathered here yet.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from ..errors import require
from ..fsutil import clean_stale_temps, jsonl_objects
from ..recipe import Recipe
from . import data as D
from .finetune import (
    CHECKPOINTS,
    TrainResult,
    dataset_paths,
    lr_at,
    peak_memory_mb,
    progress_bar,
    save_checkpoint,
    save_trained,
    spec_of,
    start_training,
    step_indices,
    usable_checkpoint,
)
from .lora import FinetuneError, load_for_training
from .rewards import Reward, build_rewards, is_right
from .sampling import generate, turn_end_ids

ADVANTAGE_EPS = 1e-4


@dataclass(frozen=True)
class Prompt:
    where: str  # FILE:LINE
    ids: list[int]  # the rendered chat prompt, generation prompt included
    example: dict[str, Any]  # the JSONL row, for the rewards


def read_prompts(path: Path, tokenizer, max_prompt_tokens: int) -> list[Prompt]:
    """The prompts of a JSONL file, each line checked; a bad line or one too long is refused naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise D.DatasetError(f"{path}: no such file") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise D.DatasetError(f"{path} is not a UTF-8 JSONL file") from None
    out = []
    for n, row in jsonl_objects(text, path, D.DatasetError):
        where, prompt = f"{path}:{n}", row.get("prompt")
        if isinstance(prompt, str) and prompt.strip():
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                         and m.get("role") in ("system", "user", "assistant")
                                                         for m in prompt):
            messages = prompt
        else:
            raise D.DatasetError(f"{where}: prompt is a non-empty string or a list of chat messages "
                                 "({'role', 'content'})")
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if len(ids) > max_prompt_tokens:
            raise D.DatasetError(f"{where}: the prompt is {len(ids)} tokens; finetune.max_seq_len leaves "
                                 f"{max_prompt_tokens} for it after grpo.max_completion_tokens")
        out.append(Prompt(where, list(ids), row))
    if not out:
        raise D.DatasetError(f"{path} has no prompts")
    return out


# -- scoring ---------------------------------------------------------------------------------
def score(rewards: list[Reward], text: str, prompt: Prompt) -> dict[str, float]:
    """Each reward's weighted value, by name."""
    return {r.name: r.weight * r(text, prompt.example, prompt.where) for r in rewards}


def advantages(totals: list[float], group: int) -> list[float]:
    """Each completion's reward against its group's: (r - mean) / (std + eps)."""
    out = []
    for i in range(0, len(totals), group):
        g = totals[i:i + group]
        mean = sum(g) / len(g)
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / len(g))
        out += [(x - mean) / (std + ADVANTAGE_EPS) for x in g]
    return out


def token_logps(model, seqs: list[tuple[list[int], list[int]]], pad_id: int, temperature: float, device):
    """Per completion token, its log-probability under `model` (logits / temperature, as sampled), and the
    mask of real completion tokens. Prompts are left-padded so every completion starts in one column, and
    logits are computed for the completion's positions only (the vocabulary projection is most of a small
    model's cost); positions count from each row's first real token, as in generation."""
    torch = require("torch", "build")
    p_width, n = max(len(p) for p, _ in seqs), max(len(c) for _, c in seqs)
    rows = [[pad_id] * (p_width - len(p)) + p + c + [pad_id] * (n - len(c)) for p, c in seqs]
    ids = torch.tensor(rows, device=device)
    attn = torch.tensor([[0] * (p_width - len(p)) + [1] * (len(p) + len(c)) + [0] * (n - len(c)) for p, c in seqs],
                        device=device)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=False, logits_to_keep=n + 1)
    logits = out.logits[:, :n].float() / temperature  # the positions before each completion token
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, p_width:].unsqueeze(-1)).squeeze(-1)
    mask = torch.tensor([[1.0] * len(c) + [0.0] * (n - len(c)) for _, c in seqs], device=device)
    return logp, mask


# -- held-out ------------------------------------------------------------------------------
def held_out(model, prompts: list[Prompt], rewards: list[Reward], tokenizer, spec, stop_ids: set[int], device,
             batch: int = 32) -> dict[str, Any]:
    """Greedy completions of the held-out prompts: the share right (rows with an `answer`) and the mean reward."""
    model.eval()
    right, totals, samples = [], [], []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        outs = generate(model, [p.ids for p in chunk], spec.grpo.max_completion_tokens, tokenizer.pad_token_id,
                        stop_ids, None, device)
        for p, out in zip(chunk, outs):
            text = tokenizer.decode(out, skip_special_tokens=True)
            totals.append(sum(score(rewards, text, p).values()))
            if "answer" in p.example:
                right.append(is_right(text, p.example["answer"]))
            if len(samples) < 5:
                samples.append({"prompt": p.example.get("prompt"), "completion": text})
    model.train()
    return {"prompts": len(prompts), "accuracy": round(sum(right) / len(right), 4) if right else None,
            "mean_reward": round(sum(totals) / len(totals), 4), "samples": samples}


# -- the loop ------------------------------------------------------------------------------
def grpo(recipe: Recipe, hf_dir: Path, out_dir: Path, run_id: str, resume: bool | None = None,
         console: Console | None = None, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train a LoRA adapter on `recipe.finetune` (method grpo); write `out_dir/adapter` (as `finetune` does)."""
    torch = require("torch", "build")
    spec = spec_of(recipe)
    g = spec.grpo
    assert g is not None
    where = str(recipe.path or recipe.name)
    console = console or Console(stderr=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FinetuneError(f"{where}: finetune.method grpo runs in one process; start it without accelerate "
                            "launch or torchrun")
    rewards = build_rewards(g.rewards, recipe.path.parent if recipe.path else Path("."))  # before the model

    ckpt = usable_checkpoint(out_dir, run_id, resume, console)
    clean_stale_temps(out_dir / CHECKPOINTS)
    torch.manual_seed(spec.seed)  # the adapters' initial weights
    train_path, eval_path = dataset_paths(recipe, out_dir)
    with console.status("loading the model and the prompts"):
        loaded = load_for_training(hf_dir, spec, device, where)
        tokenizer = loaded.tokenizer
        room = spec.max_seq_len - g.max_completion_tokens
        train = read_prompts(train_path, tokenizer, room)
        evals = read_prompts(eval_path, tokenizer, room)[:g.eval_max] if eval_path else []
    model = loaded.model
    stop_ids = turn_end_ids(model, tokenizer)
    params, optimizer, steps, state = start_training(model, spec, len(train), ckpt, run_id, console)
    start = state.get("step", 0)
    if ckpt is None and evals:
            with console.status(f"held-out: {len(evals)} prompts, greedy, before training"):
                state["held_out_before"] = held_out(model, evals, rewards, tokenizer, spec, stop_ids, device)
    console.print(
        f"grpo: {len(train)} prompts, {len(evals)} held out, {steps} steps of {spec.batch_size} prompts x "
        f"{g.num_generations} completions, rewards {', '.join(r.name for r in rewards)}, "
        f"{sum(p.numel() for p in params):,} trainable parameters on {device.type}")

    model.train()
    history: list[dict[str, Any]] = state["history"]
    seconds_run, tokens_run = 0.0, 0
    with progress_bar(console, "reward") as progress:
        task = progress.add_task("grpo", total=steps, completed=start, loss=float("nan"), tps=0.0)
        for step in range(start, steps):
            t0 = time.perf_counter()
            record = _step(model, optimizer, params, train, rewards, tokenizer, spec, step, steps, stop_ids, device)
            dt = time.perf_counter() - t0
            seconds_run += dt
            tokens_run += record.pop("tokens")
            record["seconds"] = round(dt, 2)
            history.append(record)
            done = step + 1
            progress.update(task, completed=done, loss=record["reward"], tps=tokens_run / max(seconds_run, 1e-9))
            if not console.is_terminal and (done % 10 == 0 or done == steps):
                console.print(f"step {done}/{steps}: reward {record['reward']:.3f}"
                              + (f", right {record['right']:.0%}" if "right" in record else "") + f", {dt:.1f} s")
            if done % spec.save_every == 0 and done < steps:
                save_checkpoint(out_dir, done, model, optimizer, {**state, "history": history}, spec.keep_checkpoints)
            if on_step is not None:
                on_step(done, record["loss"])
    after = None
    if evals:
        with console.status("held-out: greedy, after training"):
            after = held_out(model, evals, rewards, tokenizer, spec, stop_ids, device)
    result = TrainResult(
        adapter=str(out_dir / "adapter"), method="grpo", steps=steps, examples=len(train),
        final_loss=history[-1]["loss"] if history else float("nan"), eval_loss=None, train_tokens=tokens_run,
        tokens_per_s=round(tokens_run / max(seconds_run, 1e-9), 1), seconds=round(seconds_run, 1),
        resumed_from=start or None, peak_memory_mb=round(peak_memory_mb(torch), 1),
        target_modules=len(loaded.target_modules), trainable_params=sum(p.numel() for p in params), history=history,
        held_out={"before": state.get("held_out_before"), "after": after} if evals else None,
    )
    save_trained(model, out_dir / "adapter", hf_dir, result, run_id)
    shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)  # the adapter supersedes them
    before = (state.get("held_out_before") or {}).get("accuracy")
    console.print("[green]✓[/] adapter: " + (f"held-out accuracy {before:.1%} -> {after['accuracy']:.1%}, "
                                              if after and before is not None and after["accuracy"] is not None else "")
                  + f"{steps} steps, {result.seconds:.0f} s")
    return result


def _step(model, optimizer, params, train: list[Prompt], rewards: list[Reward], tokenizer, spec, step: int,
          steps: int, stop_ids: set[int], device) -> dict[str, Any]:
    """One GRPO step: sample the groups, score them, `iterations` optimizer steps on them."""
    torch = require("torch", "build")
    g = spec.grpo
    idx = step_indices(step, spec.batch_size, len(train), spec.seed)
    batch = [train[i] for i in idx for _ in range(g.num_generations)]  # each prompt's group together
    torch.manual_seed(spec.seed * 7919 + step * 104729)  # the sampling: a function of the step
    model.eval()
    completions = generate(model, [p.ids for p in batch], g.max_completion_tokens, tokenizer.pad_token_id,
                           stop_ids, g.temperature, device)
    model.train()
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    parts = [score(rewards, t, p) for t, p in zip(texts, batch)]
    totals = [sum(p.values()) for p in parts]
    adv = advantages(totals, g.num_generations)
    n_tokens = sum(len(c) for c in completions)
    seqs = [(p.ids, c) for p, c in zip(batch, completions)]
    micro = [list(range(i, min(i + spec.micro_batch_size, len(seqs)))) for i in range(0, len(seqs), spec.micro_batch_size)]
    old: list[Any] = [None] * len(micro)
    if g.iterations > 1:  # the ratio is against the policy that sampled; after the first update it differs
        with torch.no_grad():
            old = [token_logps(model, [seqs[i] for i in m], tokenizer.pad_token_id, g.temperature, device)[0]
                   for m in micro]
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, spec, steps)
    loss_total, kl_total = 0.0, 0.0
    for _ in range(g.iterations):
        loss_total, kl_total = 0.0, 0.0
        for k, m in enumerate(micro):
            logp, mask = token_logps(model, [seqs[i] for i in m], tokenizer.pad_token_id, g.temperature, device)
            a = torch.tensor([adv[i] for i in m], device=device).unsqueeze(1)
            ratio = torch.exp(logp - (old[k] if old[k] is not None else logp.detach()))
            per_token = -torch.min(ratio * a, ratio.clamp(1 - g.epsilon, 1 + g.epsilon) * a)
            if g.beta:
                with torch.no_grad(), model.disable_adapter():
                    ref, _ = token_logps(model, [seqs[i] for i in m], tokenizer.pad_token_id, g.temperature, device)
                kl = torch.exp(ref - logp) - (ref - logp) - 1
                per_token = per_token + g.beta * kl
                kl_total += float((kl * mask).sum().detach())
            loss = (per_token * mask).sum() / max(n_tokens, 1)
            loss.backward()
            loss_total += float(loss.detach())
        if spec.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(loss_total):
        raise FinetuneError(f"the GRPO loss became {loss_total} at step {step + 1}; lower finetune.lr")
    record: dict[str, Any] = {"step": step + 1, "loss": round(loss_total, 6),
                              "reward": round(sum(totals) / len(totals), 4), "lr": lr_at(step, spec, steps),
                              "completion_tokens": round(n_tokens / len(completions), 1), "tokens": n_tokens}
    for name in parts[0]:
        record[f"reward_{name}"] = round(sum(p[name] for p in parts) / len(parts), 4)
    if all("answer" in p.example for p in batch):
        record["right"] = round(sum(is_right(t, p.example["answer"]) for t, p in zip(texts, batch)) / len(batch), 4)
    if g.beta:
        record["kl"] = round(kl_total / max(n_tokens, 1), 6)
    return record
