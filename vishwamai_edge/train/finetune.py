"""Supervised fine-tuning (and continued pre-training) with LoRA: one readable loop.

    data   -> JSONL/text, chat template, assistant-only labels, optional packing (data.py)
    model  -> base + LoRA / QLoRA (lora.py)
    loop   -> per optimizer step: `batch_size` examples in micro-batches, gradients accumulated,
              loss = sum of token losses / trained tokens in the whole step (so accumulation
              and several GPUs give the same number as one big batch)
    output -> <out>/checkpoints/step-N/ every `save_every` steps, <out>/adapter/ at the end

Runs as is under `accelerate launch` (one process per GPU): accelerate wraps the model in
DDP, every process computes its share of each step's examples.

Resuming is exact: the examples of step s are a pure function of (seed, s), and so is
every random draw inside step s (LoRA dropout), so a run resumed from step k computes the
same steps k+1.. as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from ..errors import require
from ..fsutil import atomic_dir, clean_stale_temps, sha256_file, sha256_json, write_json
from ..recipe import FinetuneSpec, Recipe
from . import data as D
from .lora import FinetuneError, load_for_training, make_optimizer

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
TRAINED = "model"  # finetune.full: the whole trained model, an HF folder
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainResult:
    adapter: str
    method: str
    steps: int
    examples: int
    final_loss: float  # the last step's training loss
    eval_loss: float | None
    train_tokens: int  # tokens through the model (padding excluded)
    tokens_per_s: float
    seconds: float  # training time of this run (not counting a resumed run's earlier part)
    resumed_from: int | None
    peak_memory_mb: float  # CUDA: max allocated; CPU: peak resident set of the process
    target_modules: int
    trainable_params: int
    history: list[dict[str, float]] = field(default_factory=list)
    held_out: dict[str, Any] | None = None  # grpo: greedy accuracy before and after; distill: perplexities
    objective: dict[str, Any] | None = None  # distill: the teacher, the divergence and its settings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- inputs --------------------------------------------------------------------------------
def dataset_paths(recipe: Recipe, work_dir: Path | None = None) -> tuple[Path, Path | None]:
    """The train and eval files; a generated picture set (`dataset.shapes`) is drawn into `work_dir`."""
    spec = spec_of(recipe)
    ds = spec.dataset
    if ds.shapes is not None or ds.arithmetic is not None or ds.python_docs is not None:
        if work_dir is None:
            raise FinetuneError("a drawn dataset needs a work folder to be written into")
    if spec.dataset.shapes is not None:
        from .shapes import write_shapes

        sh = spec.dataset.shapes
        files = write_shapes(Path(work_dir) / "shapes", sh.train, sh.eval, sh.seed, sh.size)
        return files.train, files.eval
    if spec.dataset.arithmetic is not None:
        from .arithmetic import write_arithmetic

        ar = spec.dataset.arithmetic
        drawn = write_arithmetic(Path(work_dir) / "arithmetic", ar.train, ar.eval, ar.seed)
        return drawn.train, drawn.eval
    if ds.python_docs is not None:
        from .python_docs import write_python_docs

        docs = write_python_docs(Path(work_dir) / "python-docs", ds.python_docs.eval_chars, ds.python_docs.seed)
        return docs.train, docs.eval
    assert spec.dataset.train is not None
    train = recipe.resolve(spec.dataset.train)
    return train, recipe.resolve(spec.dataset.eval) if spec.dataset.eval else None


def run_fingerprint(recipe: Recipe, base_fingerprint: Any, work_dir: Path | None = None) -> str:
    """What a finished adapter depends on: the base, the data's bytes, the training settings."""
    spec = spec_of(recipe)
    hashes: list[Any] = []
    if spec.dataset.shapes is not None:  # the pictures are a function of these settings and the code
        hashes = ["shapes", spec.dataset.shapes.model_dump()]
    elif spec.dataset.arithmetic is not None:
        hashes = ["arithmetic", spec.dataset.arithmetic.model_dump()]
    else:
        for p in (p for p in dataset_paths(recipe, work_dir) if p is not None):
            for f in sorted(p.iterdir()) if p.is_dir() else [p]:
                hashes.append(sha256_file(f) if f.is_file() else None)
    # Saving and eval cadence do not change the weights.
    settings = spec.model_dump(mode="json", exclude={"save_every", "keep_checkpoints", "eval_every", "merge"})
    return sha256_json(["finetune", base_fingerprint, hashes, settings])


def spec_of(recipe: Recipe) -> FinetuneSpec:
    if recipe.finetune is None:
        raise FinetuneError(f"{recipe.path}: has no finetune section; see recipes/smollm2-135m-finetune.yaml")
    return recipe.finetune


def read_records(recipe: Recipe, work_dir: Path | None = None) -> tuple[list[D.Record], list[D.Record]]:
    """The train and eval records, validated line by line (before any model is loaded)."""
    spec = spec_of(recipe)
    train_path, eval_path = dataset_paths(recipe, work_dir)
    fmt = "text" if spec.method == "cpt" and spec.dataset.format == "auto" else spec.dataset.format
    train_records = D.read_dataset(train_path, fmt)
    eval_records = D.read_dataset(eval_path, fmt) if eval_path else []
    if not eval_records:
        train_records, eval_records = D.split_eval(train_records, spec.dataset.eval_fraction, spec.seed)
    return train_records, eval_records


def prepare_examples(
    recipe: Recipe, records: tuple[list[D.Record], list[D.Record]], tokenizer, processor=None
) -> tuple[list[D.Example], list[D.Example], D.EncodeStats]:
    spec = spec_of(recipe)
    train_records, eval_records = records

    def encode(records):
        if spec.method == "cpt" or (spec.method == "distill" and records[0].text is not None):
            return D.encode_text(records, tokenizer, spec.max_seq_len)
        return D.encode_chats(records, tokenizer, spec.max_seq_len, processor)

    train, stats = encode(train_records)
    evals, _ = encode(eval_records) if eval_records else ([], None)
    if not train:
        where = train_records[0].where.rsplit(":", 1)[0] if train_records else str(recipe.path)
        raise D.DatasetError(f"{where}: no example has an assistant token within finetune.max_seq_len")
    if spec.packing:
        train, evals = D.pack(train, spec.max_seq_len), D.pack(evals, spec.max_seq_len)
    return train, evals, stats


# -- data order ----------------------------------------------------------------------------
def step_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: consecutive slices of seeded per-epoch shuffles."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = min(batch_size - len(out), n - offset)
        out += order[offset : offset + take]
        pos += take
    return out


def total_steps(spec: FinetuneSpec, n_examples: int) -> int:
    return spec.steps or max(1, math.ceil(spec.epochs * n_examples / spec.batch_size))


def lr_at(step: int, spec: FinetuneSpec, total: int) -> float:
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, total - spec.warmup_steps)
    if spec.lr_schedule == "cosine":
        return spec.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if spec.lr_schedule == "linear":
        return spec.lr * (1 - progress)
    return spec.lr


# -- checkpoints ---------------------------------------------------------------------------
def latest_checkpoint(out_dir: Path) -> Path | None:
    folder = out_dir / CHECKPOINTS
    done = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(out_dir: Path, step: int, model, optimizer, state: dict[str, Any], keep: int) -> None:
    torch = require("torch", "build")
    peft = require("peft", "train")
    from safetensors.torch import save_file

    from safetensors.torch import save_model

    final = out_dir / CHECKPOINTS / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        if is_adapted(model):
            weights = {k: v.detach().cpu().contiguous() for k, v in peft.get_peft_model_state_dict(model).items()}
            save_file(weights, str(tmp / "adapter_model.safetensors"))
        else:  # every weight trains; save_model keeps tied embeddings tied
            save_model(model, str(tmp / "model.safetensors"))
        torch.save({**state, "step": step, "optimizer": optimizer.state_dict()}, tmp / STATE_FILE)
    for old in sorted((out_dir / CHECKPOINTS).glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def start_training(model, spec: FinetuneSpec, n_examples: int, ckpt: Path | None, run_id: str,
                   console: Console | None) -> tuple[list, Any, int, dict[str, Any]]:
    """The trainable parameters, their optimizer, the number of steps, and the trainer state: fresh, or the
    checkpoint's (its `step` the one to go on from), said on `console`."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(spec, params)
    steps = total_steps(spec, n_examples)
    state: dict[str, Any] = {"run_id": run_id, "history": []}
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, run_id)
        if console is not None:
            console.print(f"resuming from {ckpt.name} (step {state['step']} of {steps})")
    return params, optimizer, steps, state


def usable_checkpoint(out_dir: Path, run_id: str, resume: bool | None, console: Console,
                      main: bool = True) -> Path | None:
    """The checkpoint to continue from: resume True continues (an error if it came from other settings),
    None continues one of the same settings and discards another, False refuses to overwrite one."""
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None and resume is False:
        raise FinetuneError(
            f"{out_dir / CHECKPOINTS} holds a checkpoint ({ckpt.name}); pass --resume to continue from it, "
            f"or delete {out_dir} to start over"
        )
    if ckpt is not None and resume is None and _checkpoint_run_id(ckpt) != run_id:
        if main:
            console.print(f"[yellow]![/] settings changed: discarding {ckpt.parent}")
            shutil.rmtree(ckpt.parent, ignore_errors=True)
        ckpt = None
    if ckpt is None and resume:
        console.print(f"no checkpoint in {out_dir / CHECKPOINTS}: starting from step 0")
    return ckpt


def load_checkpoint(ckpt: Path, model, optimizer, run_id: str) -> dict[str, Any]:
    require("torch", "build")
    peft = require("peft", "train")
    from safetensors.torch import load_file, load_model

    state = checkpoint_state(ckpt)
    if state is None or state.get("run_id") != run_id:
        raise FinetuneError(
            f"checkpoint {ckpt} was made from other data or settings than the recipe's now; "
            f"delete {ckpt.parent} to start over"
        )
    if is_adapted(model):
        peft.set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
    else:
        load_model(model, str(ckpt / "model.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    return state


# -- the loop ------------------------------------------------------------------------------
def finetune(
    recipe: Recipe,
    hf_dir: Path,
    out_dir: Path,
    run_id: str,
    resume: bool | None = None,
    console: Console | None = None,
    on_step: Callable[[int, float], None] | None = None,
    teacher_dir: Path | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `recipe.finetune`; write `out_dir/adapter` (with `full`, the model to
    `out_dir/model`). Method distill learns the distributions of the model in `teacher_dir`.

    resume: True continues from the latest checkpoint (an error if it came from other
    settings); None continues when the checkpoint matches and starts over otherwise;
    False refuses to overwrite an existing checkpoint. `on_step(step, loss)` runs after
    every optimizer step (and its checkpoint).
    """
    torch = require("torch", "build")
    accelerate = require("accelerate", "build")
    spec = spec_of(recipe)
    where = str(recipe.path or recipe.name)
    console = console or Console(stderr=True)

    acc = accelerate.Accelerator(cpu=not torch.cuda.is_available())
    main = acc.is_main_process
    world = acc.num_processes
    per_rank = spec.batch_size // world
    if spec.batch_size % (world * spec.micro_batch_size):
        raise FinetuneError(
            f"{where}: finetune.batch_size ({spec.batch_size}) must be a multiple of micro_batch_size "
            f"({spec.micro_batch_size}) x processes ({world})"
        )

    ckpt = usable_checkpoint(out_dir, run_id, resume, console, main)
    accelerate.utils.set_seed(spec.seed)  # the adapters' initial weights
    clean_stale_temps(out_dir / CHECKPOINTS)
    records = read_records(recipe, out_dir)  # a bad line fails now, not after loading the model
    with console.status("loading the model and tokenizing the data"):
        loaded = load_for_training(hf_dir, spec, acc.device, where)
        train, evals, stats = prepare_examples(recipe, records, loaded.tokenizer, loaded.processor)
    model = loaded.model
    pad_id = loaded.tokenizer.pad_token_id
    objective: Any = CrossEntropy()
    if spec.method == "distill":
        objective = distillation(spec, teacher_dir, loaded, acc.device, where)
    params, optimizer, steps, state = start_training(model, spec, len(train), ckpt, run_id, console if main else None)
    start = state.get("step", 0)
    if getattr(objective, "teacher", None) is not None and evals and ckpt is None:
        with console.status(f"held-out perplexity of the teacher and the student, {len(evals)} blocks"):
            state["held_out_before"] = {
                "teacher": perplexity(evaluate(objective.teacher, evals, spec, pad_id, acc, loaded.dtype)),
                "student": {**perplexity(evaluate(model, evals, spec, pad_id, acc, loaded.dtype)),
                            "divergence": round(evaluate(model, evals, spec, pad_id, acc, loaded.dtype,
                                                         objective.loss_sum), 5)}}
    model = acc.prepare_model(model)

    if main:
        console.print(
            f"{spec.method}: {len(train)} training examples ({stats.truncated} truncated, {stats.dropped} dropped), "
            f"{len(evals)} eval, {steps} steps of {spec.batch_size}, "
            + ("every weight trained, " if spec.full else f"{len(loaded.target_modules)} adapted layers, ") +
            f"{sum(p.numel() for p in params):,} trainable parameters, {world} process(es) on {acc.device.type}"
        )

    def step_loss(step: int) -> tuple[float, int]:
        """One optimizer step's forward/backward; returns (loss, tokens this process ran)."""
        idx = step_indices(step, spec.batch_size, len(train), spec.seed)
        mine = idx[acc.process_index * per_rank : (acc.process_index + 1) * per_rank]
        # on-policy distillation trains on the student's own continuations, sampled now
        examples = objective.prepare(step, [train[i] for i in mine], acc.unwrap_model(model), acc.device)
        # the whole step's trained tokens, over all processes: the loss is a sum over them divided by their number
        n_target = int(acc.reduce(torch.tensor(sum(map(_n_targets, examples)), device=acc.device),
                                  reduction="sum").item())
        micro = [examples[i : i + spec.micro_batch_size] for i in range(0, len(examples), spec.micro_batch_size)]
        total, tokens = 0.0, 0
        for k, chunk in enumerate(micro):
            batch = D.collate(chunk, pad_id)
            tokens += batch.pop("n_tokens")
            sync = k == len(micro) - 1
            with acc.no_sync(model) if not sync else contextlib.nullcontext():
                loss_sum = objective.loss_sum(model, batch, acc.device, loaded.dtype)
                # DDP averages gradients over processes; scale back to a sum over the whole step
                acc.backward(loss_sum * world / max(n_target, 1))
            total += loss_sum.item()
        loss = acc.reduce(torch.tensor(total, device=acc.device), reduction="sum").item() / max(n_target, 1)
        return loss, tokens

    model.train()
    history: list[dict[str, float]] = state["history"]
    tokens_run, seconds_run = 0, 0.0
    eval_loss = None
    progress = progress_bar(console, disable=not main)
    with progress:
        task = progress.add_task("fine-tuning", total=steps, completed=start, loss=float("nan"), tps=0.0)
        for step in range(start, steps):
            t0 = time.perf_counter()
            torch.manual_seed(spec.seed * 7919 + step * 104729 + acc.process_index)  # dropout: a function of step
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, spec, steps)
            loss, tokens = step_loss(step)
            if spec.max_grad_norm:
                acc.clip_grad_norm_(params, spec.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(loss):
                raise FinetuneError(f"the training loss became {loss} at step {step + 1}; lower finetune.lr")
            dt = time.perf_counter() - t0
            tokens = int(acc.reduce(torch.tensor(tokens, device=acc.device), reduction="sum").item())
            tokens_run += tokens
            seconds_run += dt
            record = {"step": step + 1, "loss": round(loss, 6), "lr": lr_at(step, spec, steps),
                      "tokens_per_s": round(tokens / dt, 1)}
            if spec.method == "distill":
                record["on_policy"] = objective.on_policy_step(step)
            done = step + 1
            if evals and spec.eval_every and done % spec.eval_every == 0 and done < steps:
                record["eval_loss"] = round(evaluate(model, evals, spec, pad_id, acc, loaded.dtype), 6)
            history.append(record)
            progress.update(task, completed=done, loss=loss, tps=tokens_run / max(seconds_run, 1e-9))
            if main and not console.is_terminal and (done % 10 == 0 or done == steps):
                console.print(f"step {done}/{steps}: loss {loss:.4f}, {tokens_run / seconds_run:.0f} tokens/s")
            if done % spec.save_every == 0 and done < steps:
                if main:
                    save_checkpoint(out_dir, done, acc.unwrap_model(model), optimizer,
                                     {"run_id": run_id, "history": history}, spec.keep_checkpoints)
                acc.wait_for_everyone()
            if on_step is not None:
                on_step(done, loss)
        if evals:
            eval_loss = evaluate(model, evals, spec, pad_id, acc, loaded.dtype)

    held = None
    if "held_out_before" in state and eval_loss is not None:  # distill: what pruning cost, what training won back
        before, after = state["held_out_before"], perplexity(eval_loss)
        after["divergence"] = round(evaluate(model, evals, spec, pad_id, acc, loaded.dtype, objective.loss_sum), 5)
        gap = before["student"]["ppl"] - before["teacher"]["ppl"]
        held = {"blocks": len(evals), **before, "after": after,
                "recovered": round((before["student"]["ppl"] - after["ppl"]) / gap, 4) if gap > 0 else None}
    result = TrainResult(
        adapter=str(out_dir / ADAPTER), method=spec.method, steps=steps, examples=len(train),
        final_loss=history[-1]["loss"] if history else float("nan"),
        eval_loss=round(eval_loss, 6) if eval_loss is not None else None,
        train_tokens=tokens_run, tokens_per_s=round(tokens_run / max(seconds_run, 1e-9), 1),
        seconds=round(seconds_run, 1), resumed_from=start or None, peak_memory_mb=round(peak_memory_mb(torch), 1),
        target_modules=len(loaded.target_modules), trainable_params=sum(p.numel() for p in params),
        history=history, held_out=held,
        objective={"teacher": str(teacher_dir), **spec.distill.model_dump(mode="json", exclude={"teacher"})}
        if spec.distill is not None else None,
    )
    if main:
        save_trained(acc.unwrap_model(model), output_dir(out_dir, spec), hf_dir, result, run_id)
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)  # the adapter supersedes them
        console.print(
            f"[green]✓[/] adapter: final loss {result.final_loss:.4f}"
            + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
            + f", {result.tokens_per_s:.0f} tokens/s, {result.seconds:.0f} s"
        )
    acc.wait_for_everyone()
    return result


class CrossEntropy:
    """The SFT objective: the examples as they are, the summed token cross-entropy."""

    teacher = None

    def prepare(self, step: int, examples: list[D.Example], model, device) -> list[D.Example]:
        return examples

    def loss_sum(self, model, batch: dict[str, Any], device, dtype):
        return _loss_sum(model, batch, device, dtype)


def distillation(spec: FinetuneSpec, teacher_dir: Path | None, loaded, device, where: str):
    from .distill import Distillation, load_teacher
    from .sampling import turn_end_ids

    if teacher_dir is None:
        raise FinetuneError(f"{where}: method distill needs a teacher (finetune.distill.teacher)")
    assert spec.distill is not None
    teacher = load_teacher(teacher_dir, loaded.tokenizer, device, loaded.dtype, where)
    return Distillation(spec.distill, teacher, spec.seed, loaded.tokenizer.pad_token_id,
                        turn_end_ids(loaded.model, loaded.tokenizer), spec.max_seq_len)


def perplexity(loss: float) -> dict[str, float]:
    return {"loss": round(loss, 5), "ppl": round(math.exp(min(loss, 50.0)), 3)}


def _n_targets(ex: D.Example) -> int:
    return sum(1 for x in ex.labels[1:] if x != D.IGNORE)  # the first label is never predicted


def _loss_sum(model, batch: dict[str, Any], device, dtype):
    import torch.nn.functional as F

    labels = batch.pop("labels").to(device)
    # pixel values follow the model's dtype; ids and masks stay integers
    inputs = {k: v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
    logits = model(**inputs, use_cache=False).logits  # with a cache, transformers ignores packing
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
        ignore_index=D.IGNORE, reduction="sum",
    )


def evaluate(model, examples: list[D.Example], spec: FinetuneSpec, pad_id: int, acc, dtype,
             loss_sum: Callable[..., Any] | None = None) -> float:
    """Mean token loss over the eval set (assistant tokens, like training); cross-entropy unless `loss_sum`."""
    torch = require("torch", "build")
    mine = examples[acc.process_index :: acc.num_processes]
    total = torch.zeros(2, device=acc.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(mine), spec.micro_batch_size):
            chunk = mine[i : i + spec.micro_batch_size]
            batch = D.collate(chunk, pad_id)
            batch.pop("n_tokens")
            total[0] += (loss_sum or _loss_sum)(model, batch, acc.device, dtype)
            total[1] += sum(_n_targets(e) for e in chunk)
    model.train(was_training)
    total = acc.reduce(total, reduction="sum")
    return (total[0] / total[1].clamp(min=1)).item()


def is_adapted(model) -> bool:
    return hasattr(model, "peft_config")


def output_dir(out_dir: Path, spec: FinetuneSpec) -> Path:
    """Where a run's result goes: the adapter, or with `full` the whole model."""
    return out_dir / (TRAINED if spec.full else ADAPTER)


def save_trained(model, out: Path, hf_dir: Path, result: TrainResult, run_id: str) -> None:
    """The adapter (with where its base lives, for `vishwamai-edge merge` without --base), or with `full` an HF
    folder: the model with the base's tokenizer, chat template and generation config."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if is_adapted(model):
            cfg_path = tmp / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = str(Path(hf_dir).resolve())
            cfg_path.write_text(json.dumps(cfg, indent=2))
        else:
            for f in Path(hf_dir).iterdir():
                if f.is_file() and not (tmp / f.name).exists() and not f.name.startswith("model"):
                    shutil.copy2(f, tmp / f.name)
        write_json(tmp / "training.json", {**result.to_dict(), "run_id": run_id})


def checkpoint_state(ckpt: Path) -> dict[str, Any] | None:
    """A checkpoint's trainer state; None for a half-written file (then it is not ours).

    Read with `weights_only=True`: our own state is tensors, numbers, strings and lists, all
    of which that unpickler accepts, and a planted pickle that would run code is refused
    before anything in it runs (a FinetuneError naming the file), never silently discarded.
    """
    import pickle

    torch = require("torch", "build")
    path = ckpt / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise FinetuneError(
            f"{path} holds objects other than tensors and numbers, so it is not a checkpoint this tool wrote; "
            f"it was refused, not unpickled: delete {ckpt.parent} to start over"
        ) from None
    except Exception:  # noqa: BLE001  a truncated or unreadable file
        return None
    return state if isinstance(state, dict) else None


def _checkpoint_run_id(ckpt: Path) -> str | None:
    state = checkpoint_state(ckpt)
    return state.get("run_id") if state else None


def peak_memory_mb(torch) -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def progress_bar(console: Console, metric: str = "loss", disable: bool = False):
    """Steps with the running `metric` (a task field named `loss`) and tokens per second."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn(metric + " {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=disable,
    )
