"""`method: align`: attach a frozen pretrained image (or audio) encoder to an LLM through a trained projector.

    stage 1 (`steps` at `lr`)               the projector alone learns to map the encoder's features
                                            to rows the frozen LLM reads (LLaVA's pre-training stage)
    stage 2 (`align.stage2_steps` at        LoRA on the LLM (the `lora` section) trains with the projector
             `align.stage2_lr`)             (LLaVA's instruction-tuning stage); merged at the end

Data are the chat JSONL the text fine-tuning reads, with image parts (or the generated
shapes set). An image is one placeholder token in the chat; in training it is repeated
`projector.tokens` times and the projector's rows are scattered into those positions of the
input embeddings, which is what the device does with the same rows. The encoder is frozen
and sees no augmentation, so each image is encoded once, before training.

Steps, data order, checkpoints and resume work as in `finetune.py` (the examples and random
draws of step s are a function of (seed, s)), so an interrupted run resumed from its latest
checkpoint ends at the same weights. The result is an aligned folder (train/aligned_folder.py).

With an audio encoder (`encoder.kind: whisper`) the parts are audio files instead
(`{"type": "audio", "audio": "clip.wav"}`, each at most one 30 s window), the placeholder is
`align.audio_token`, and the projector stacks `projector.stack` frames per row; the rest is the same.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from ..errors import peft_on_transformers, quiet_transformers, require
from ..fsutil import atomic_dir, clean_stale_temps, write_json
from ..recipe import FinetuneSpec, Recipe
from ..runtime.audio import window_features
from ..runtime.chat_template import CHATML_TEMPLATE, render_chat
from ..runtime.preprocess import preprocess
from . import encoders as E
from .aligned_folder import image_chat_template, load_projector_weights, splice, write_aligned
from .projector import make_projector, stacked_tokens
from . import data as D
from .finetune import (
    CHECKPOINTS,
    STATE_FILE,
    TrainResult,
    _n_targets,
    peak_memory_mb,
    progress_bar,
    spec_of,
    checkpoint_state,
    latest_checkpoint,
    lr_at,
    prepare_examples,
    read_records,
    step_indices,
    total_steps,
)
from .lora import FinetuneError, training_dtype
from .lora_targets import resolve_target_modules

ALIGNED = "aligned"
FEATURES = "encoder_features"  # the example's frozen-encoder outputs, in its placeholder order
# the shared prefix's cache against the whole forward, relative to the largest logit: fp32 only sums
# in another order (measured 1e-6 on SmolLM2), bf16/fp16 round more; a cache that does not fit the
# model is off by far more
PREFIX_TOLERANCE = {"float32": 1e-3, "half": 5e-2}


class AlignProcessor:
    """What `data.encode_chat` needs of a multimodal processor, for an encoder + projector made here:
    the chat template (rendered as the device renders it), the tokenizer, and per image (or audio
    clip) the placeholder repeated `tokens` times with the frozen encoder's features."""

    def __init__(self, tokenizer: Any, template: str, placeholder: str, tokens: int, encoder: Any):
        self.tokenizer = tokenizer
        self.chat_template = template
        self.modality = encoder.modality
        self.image_token = self.audio_token = placeholder  # the names HF processors give them
        self.tokens = tokens
        self.encoder = encoder
        self._features: dict[bytes, Any] = {}  # by content digest: a picture asked about twice is encoded once

    def apply_chat_template(self, messages: list[dict[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        return render_chat(self.chat_template, messages, bos_token=self.tokenizer.bos_token or "",
                           eos_token=self.tokenizer.eos_token or "", add_generation_prompt=add_generation_prompt)

    def __call__(self, text: list[str], images: list[Any] | None = None, audio: list[tuple[np.ndarray, int]] | None = None,
                 return_tensors: str = "pt", add_special_tokens: bool = False) -> dict[str, Any]:
        torch = require("torch", "train")
        placeholder = self.tokenizer.convert_tokens_to_ids(self.image_token)
        ids = self.tokenizer(text[0], add_special_tokens=add_special_tokens)["input_ids"]
        expanded = [t for tok in ids for t in ([tok] * self.tokens if tok == placeholder else [tok])]
        if audio is not None:
            feats = [self.features(*clip) for clip in audio]
        else:
            feats = [self.features(np.asarray(im.convert("RGB"))) for im in images or []]
        return {"input_ids": torch.tensor([expanded]), FEATURES: torch.stack(feats)}

    def features(self, data: np.ndarray, sample_rate: int | None = None) -> Any:
        """The frozen encoder's output for pixels (H, W, 3), or for audio samples at `sample_rate`."""
        torch = require("torch", "train")
        key = hashlib.blake2b(data.tobytes() + str((data.shape, sample_rate)).encode(), digest_size=16).digest()
        if key not in self._features:
            if self.modality == "audio":
                x = window_features(data, int(sample_rate or 0), self.encoder.settings["n_mels"])
            else:
                x = preprocess(data, self.encoder.spec)
            with torch.no_grad():
                self._features[key] = self.encoder.module(torch.from_numpy(x[None]))[0]
        return self._features[key]


def add_image_token(tokenizer: Any, llm: Any, text: str) -> dict[str, Any]:
    """The image (or audio) placeholder as a special token; a new one gets the mean embedding row (it is never
    read, the projector's rows replace it, but the output layer of a tied model keeps it)."""
    if text not in tokenizer.get_vocab():
        tokenizer.add_tokens([text], special_tokens=True)
        resize_embeddings(llm, len(tokenizer))
    return {"text": text, "id": int(tokenizer.convert_tokens_to_ids(text))}


def resize_embeddings(llm: Any, rows: int) -> None:
    """`rows` embedding rows, the new ones the mean of the old."""
    torch = require("torch", "train")
    old = llm.get_input_embeddings().weight.shape[0]
    llm.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        emb = llm.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(0)
        out = llm.get_output_embeddings()
        if out is not None and out.weight is not emb:
            out.weight[old:] = out.weight[:old].mean(0)


QuantizedWeights = Callable[[], dict[str, Any]]  # the LLM's state as the bundle's quantization leaves it


def load_quantized_llm(hf_dir: Path, state: dict[str, Any], dtype: Any) -> Any:
    """The LLM as the bundle runs it (finetune.align.quantized_llm): the source's config (a GGUF does not carry
    all of it, e.g. Llama 3's RoPE scaling) with `state`, the weights back from llama.cpp's quantization
    (stages/finetune.py makes them: export/quantize.py's `round_trip_state`)."""
    transformers = quiet_transformers()
    llm = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, trust_remote_code=False)
    try:
        got = llm.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    except RuntimeError as exc:  # a shape that changed on the way through GGUF
        raise FinetuneError(f"{hf_dir}: its quantized round trip does not fit the model: "
                            f"{str(exc).splitlines()[-1].strip()}") from None
    tied = {"lm_head.weight"} if llm.config.tie_word_embeddings else set()
    lost = sorted(set(got.missing_keys) - tied) + sorted(got.unexpected_keys)
    if lost:
        raise FinetuneError(f"{hf_dir}: its quantized round trip does not fit the model: {', '.join(lost)}")
    return llm


def _core(llm: Any) -> Any:
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


class SharedPrefix:
    """The key/value cache of the tokens every example starts with (the system prompt and the
    user header before the first image), computed once. Only while the LLM is frozen (stage 1):
    nothing there depends on the projector, so each step runs the rest of the sequence on this
    cache instead of the whole prompt again (23 of SmolLM2's 59 positions for a shapes example)."""

    def __init__(self, llm: Any, ids: list[int], device: Any):
        torch = require("torch", "train")
        self.length = len(ids)
        self.config = _core(llm).config
        with torch.no_grad():
            cache = _core(llm).model(input_ids=torch.tensor([ids], device=device), use_cache=True).past_key_values
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]
        # transformers 5.x renames the forward's `past_key_values` to `cache`
        self.keyword = "cache" if "cache" in inspect.signature(_core(llm).model.forward).parameters \
            else "past_key_values"

    def cache(self, batch_size: int) -> Any:
        """A fresh cache for one forward pass (a forward appends to it), as views of the stored tensors."""
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=[(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))
                                            for k, v in self.layers], config=self.config)


def shared_prefix_ids(examples: list[D.Example], placeholder: int) -> list[int]:
    """The tokens all examples begin with, up to the first placeholder or labelled token (the
    projector's rows and the loss come after it). Empty for packed rows (each row holds several
    conversations)."""
    if not examples or examples[0].position_ids is not None:
        return []
    first = examples[0]
    n = next((i for i, (t, lab) in enumerate(zip(first.input_ids, first.labels))
              if t == placeholder or lab != D.IGNORE), len(first.input_ids))
    for ex in examples[1:]:
        n = min(n, len(ex.input_ids))
        n = next((i for i in range(n) if ex.input_ids[i] != first.input_ids[i]), n)
    return first.input_ids[:n]


def _logits_at_labels(llm: Any, projector: Any, batch: dict[str, Any], image_id: int, device: Any,
                      prefix: SharedPrefix | None = None):
    """Logits at the positions that predict a labelled token, and those labels. With `prefix`, the
    batch's first `prefix.length` positions come from its cache."""
    core = _core(llm)
    start = prefix.length if prefix is not None else 0
    ids = batch["input_ids"][:, start:].to(device)
    labels = batch["labels"][:, start:].to(device)
    embeds = core.get_input_embeddings()(ids)
    if FEATURES in batch:
        rows = projector(batch[FEATURES].to(device))
        embeds = splice(embeds, ids, rows, image_id)
    past = {prefix.keyword: prefix.cache(ids.shape[0])} if prefix is not None else {}
    hidden = core.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(device),
                        use_cache=prefix is not None, **past).last_hidden_state
    keep = labels[:, 1:] != D.IGNORE
    # only the answer's positions go through the output layer: most of a prompt has no loss
    return core.lm_head(hidden[:, :-1][keep]).float(), labels[:, 1:][keep]


def _loss_sum(llm, projector, batch, image_id, device, prefix: SharedPrefix | None = None):
    import torch.nn.functional as F

    logits, labels = _logits_at_labels(llm, projector, batch, image_id, device, prefix)
    return F.cross_entropy(logits, labels, reduction="sum")


def _prefix_for(llm: Any, projector: Any, examples: list[D.Example], pad_id: int, image_id: int,
                device: Any, console: Console) -> SharedPrefix | None:
    """The shared prefix's cache, if the prompts have one and the model's forward on it gives the
    logits of the whole sequence (checked on a few examples: a family whose cache does not fit
    this use trains on whole sequences, only slower)."""
    torch = require("torch", "train")
    ids = shared_prefix_ids(examples, image_id)
    if len(ids) < 2:
        return None
    prefix = SharedPrefix(llm, ids, device)
    batch = D.collate(examples[:4], pad_id)
    with torch.no_grad():
        whole, _ = _logits_at_labels(llm, projector, batch, image_id, device)
        cached, _ = _logits_at_labels(llm, projector, batch, image_id, device, prefix)
    diff = float((whole - cached).abs().max())
    tolerance = PREFIX_TOLERANCE["float32" if _core(llm).dtype == torch.float32 else "half"]
    if diff > tolerance * max(1.0, float(whole.abs().max())):
        console.print(f"[yellow]![/] the shared prompt prefix's cache moved the logits by {diff:.3g}; "
                      "training on whole sequences")
        return None
    return prefix


def _add_lora(llm: Any, spec: FinetuneSpec, where: str) -> tuple[Any, list[str]]:
    torch = require("torch", "train")
    peft = require("peft", "train")
    targets = resolve_target_modules(llm, spec.lora.target_modules, where)
    torch.manual_seed(spec.seed * 31 + 1)  # the adapters' initial weights: a function of the seed
    config = peft.LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                             target_modules=targets, bias="none", task_type="CAUSAL_LM")
    with peft_on_transformers():
        return peft.get_peft_model(llm, config), targets


def _trainable(llm: Any, projector: Any) -> list[Any]:
    return list(projector.parameters()) + [p for p in llm.parameters() if p.requires_grad]


def save_checkpoint(out_dir: Path, step: int, llm, projector, optimizer, state: dict[str, Any], keep: int) -> None:
    torch = require("torch", "train")
    peft = require("peft", "train")
    from safetensors.torch import save_file

    final = out_dir / CHECKPOINTS / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()},
                  str(tmp / "projector.safetensors"))
        if hasattr(llm, "get_base_model"):
            lora = peft.get_peft_model_state_dict(llm, save_embedding_layers=False)  # frozen
            save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
        torch.save({**state, "step": step, "optimizer": optimizer.state_dict()}, tmp / STATE_FILE)
    for old in sorted((out_dir / CHECKPOINTS).glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def align(
    recipe: Recipe,
    hf_dir: Path,
    out_dir: Path,
    run_id: str,
    resume: bool | None = None,
    console: Console | None = None,
    on_step: Callable[[int, float], None] | None = None,
    quantized_weights: QuantizedWeights | None = None,
) -> TrainResult:
    """Stage 1 (+ stage 2) on `recipe.finetune`; write `out_dir/aligned`. `resume` as in `finetune`.
    `quantized_weights`: the LLM's weights to train against when the recipe sets quantized_llm."""
    torch = require("torch", "train")
    transformers = quiet_transformers()
    peft = require("peft", "train")
    from safetensors.torch import load_file

    spec = spec_of(recipe)
    assert spec.align is not None
    a = spec.align
    where = str(recipe.path or recipe.name)
    console = console or Console(stderr=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = training_dtype(spec, device.type)
    out_dir = Path(out_dir)

    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None and resume is False:
        raise FinetuneError(f"{out_dir / CHECKPOINTS} holds a checkpoint ({ckpt.name}); pass --resume to continue "
                            f"from it, or delete {out_dir} to start over")
    state = checkpoint_state(ckpt) if ckpt is not None else None
    if ckpt is not None and (state is None or state.get("run_id") != run_id):
        if resume:
            raise FinetuneError(f"checkpoint {ckpt} was made from other data or settings than the recipe's now; "
                                f"delete {ckpt.parent} to start over")
        console.print(f"[yellow]![/] settings changed: discarding {ckpt.parent}")
        shutil.rmtree(ckpt.parent, ignore_errors=True)
        ckpt, state = None, None
    clean_stale_temps(out_dir / CHECKPOINTS)
    clean_stale_temps(out_dir)  # a quantized LLM left by a killed run

    records = read_records(recipe, out_dir)  # a bad line fails now, before any model is loaded
    encoder_path = recipe.resolve(a.encoder.path) if a.encoder.path else None
    with console.status("loading the encoder and the tokenizer"):
        encoder = E.load_pretrained(a.encoder.kind, encoder_path, a.encoder.feature_layer)
        encoder.module.to(device)
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    if a.quantized_llm:
        if quantized_weights is None:
            raise FinetuneError(f"{recipe.path}: finetune.align.quantized_llm: run align through `build` or "
                                "`finetune`, which quantize the LLM to train against")
        with console.status(f"quantizing the LLM to {a.quantized_llm} with llama.cpp, to train against it"):
            weights = quantized_weights()
        llm = load_quantized_llm(hf_dir, weights, dtype).to(device)
    else:
        llm = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype,
                                                                trust_remote_code=False).to(device)
    with console.status(f"encoding the {'audio' if a.encoder.kind == 'whisper' else 'images'}"):
        for p in llm.parameters():
            p.requires_grad_(False)
        audio = encoder.modality == "audio"
        placeholder = a.audio_token if audio else a.image_token
        new_token = placeholder not in tokenizer.get_vocab()
        image_token = add_image_token(tokenizer, llm, placeholder)
        tokenizer.chat_template = image_chat_template(tokenizer.chat_template or CHATML_TEMPLATE, placeholder,
                                                      encoder.modality)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        width = llm.config.hidden_size
        torch.manual_seed(spec.seed)  # the projector's initial weights
        tokens = (stacked_tokens(encoder.grid[0], a.projector.stack) if audio
                  else _tokens(a.projector.tokens, encoder, where))
        projector = make_projector(encoder.dim, width, encoder.grid, tokens, a.projector.depth, a.projector.hidden,
                                   a.projector.stack).to(device)
        if a.projector.init is not None:
            load_projector_weights(recipe.resolve(a.projector.init), projector, f"{where}: finetune.align.projector.init")
        processor = AlignProcessor(tokenizer, tokenizer.chat_template, placeholder, projector.tokens, encoder)
        train, evals, stats = prepare_examples(recipe, records, tokenizer, processor)
    if not any(FEATURES in ex.extra for ex in train):
        what = ("audio", "sound (content parts {\"type\": \"audio\", \"audio\": \"clip.wav\"})") if audio else \
            ("an image", "pictures (content parts {\"type\": \"image\", \"image\": \"path.png\"})")
        raise D.DatasetError(f"{where}: finetune.dataset: no training example has {what[0]}; align trains on "
                             f"{what[1]}")

    s1 = total_steps(spec, len(train))
    s2 = a.stage2_steps
    steps = s1 + s2
    stage2_spec = spec.model_copy(update={"lr": a.stage2_lr, "warmup_steps": 0})
    targets: list[str] = []

    def optimizer_for(params):
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)

    start = 0
    history: list[dict[str, float]] = []
    if state is not None and ckpt is not None:
        start = int(state["step"])
        history = state["history"]
        projector.load_state_dict(load_file(str(ckpt / "projector.safetensors")))
        if start > s1 or (ckpt / "lora.safetensors").is_file():
            llm, targets = _add_lora(llm, spec, where)
            peft.set_peft_model_state_dict(llm, load_file(str(ckpt / "lora.safetensors")))
        console.print(f"resuming from {ckpt.name} (step {start} of {steps})")
    optimizer = optimizer_for(_trainable(llm, projector))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    pad_id = tokenizer.pad_token_id
    image_id = image_token["id"]
    console.print(
        f"align: {encoder.name} ({encoder.grid[0]}x{encoder.grid[1]} x {encoder.dim}) -> projector "
        f"(depth {projector.depth}, {projector.tokens} tokens x {width}) -> {hf_dir.name}; {len(train)} training "
        f"examples, {len(evals)} eval; stage 1: {s1} steps" + (f", stage 2 (LoRA): {s2} steps" if s2 else "")
        + f" of {spec.batch_size}, on {device.type}"
    )

    def step_loss(step: int) -> tuple[float, int]:
        idx = step_indices(step, spec.batch_size, len(train), spec.seed)
        n_target = sum(_n_targets(train[i]) for i in idx)
        total, tokens = 0.0, 0
        for i in range(0, len(idx), spec.micro_batch_size):
            batch = D.collate([train[j] for j in idx[i : i + spec.micro_batch_size]], pad_id)
            tokens += batch.pop("n_tokens")
            loss_sum = _loss_sum(llm, projector, batch, image_id, device, prefix)
            (loss_sum / max(n_target, 1)).backward()
            total += loss_sum.item()
        return total / max(n_target, 1), tokens

    def evaluate() -> float:
        total, n = 0.0, 0
        training = llm.training
        projector.eval()
        llm.eval()
        with torch.no_grad():
            for i in range(0, len(evals), spec.micro_batch_size):
                chunk = evals[i : i + spec.micro_batch_size]
                batch = D.collate(chunk, pad_id)
                batch.pop("n_tokens")
                total += _loss_sum(llm, projector, batch, image_id, device, prefix).item()
                n += sum(_n_targets(e) for e in chunk)
        projector.train()
        llm.train(training)
        return total / max(n, 1)

    # Stage 1: the frozen LLM runs as at inference (no dropout), from the shared prefix's cache.
    prefix = _prefix_for(llm, projector, train + evals, pad_id, image_id, device, console) if start < s1 else None
    projector.train()
    llm.train(start >= s1)
    tokens_run, seconds_run, eval_loss = 0, 0.0, None
    with progress_bar(console, disable=False) as progress:
        task = progress.add_task("aligning", total=steps, completed=start, loss=float("nan"), tps=0.0)
        for step in range(start, steps):
            if step == s1 and s2 and not hasattr(llm, "get_base_model"):  # stage 2 begins
                llm, targets = _add_lora(llm, spec, where)
                llm.train()
                prefix = None  # the LLM trains from here: its prefix is no longer a constant
                optimizer = optimizer_for(_trainable(llm, projector))
            t0 = time.perf_counter()
            torch.manual_seed(spec.seed * 7919 + step * 104729)  # dropout: a function of the step
            lr = lr_at(step, spec, s1) if step < s1 else lr_at(step - s1, stage2_spec, s2)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, tokens = step_loss(step)
            if spec.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(_trainable(llm, projector), spec.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(loss):
                raise FinetuneError(f"the training loss became {loss} at step {step + 1}; lower finetune.lr")
            dt = time.perf_counter() - t0
            tokens_run += tokens
            seconds_run += dt
            done = step + 1
            record = {"step": done, "stage": 1 if step < s1 else 2, "loss": round(loss, 6), "lr": lr,
                      "tokens_per_s": round(tokens / dt, 1)}
            if evals and spec.eval_every and done % spec.eval_every == 0 and done < steps:
                record["eval_loss"] = round(evaluate(), 6)
            history.append(record)
            progress.update(task, completed=done, loss=loss, tps=tokens_run / max(seconds_run, 1e-9))
            if not console.is_terminal and (done % 10 == 0 or done == steps):
                console.print(f"step {done}/{steps}: loss {loss:.4f}, {tokens_run / seconds_run:.0f} tokens/s")
            if done % spec.save_every == 0 and done < steps:
                save_checkpoint(out_dir, done, llm, projector, optimizer, {"run_id": run_id, "history": history},
                                 spec.keep_checkpoints)
            if on_step is not None:
                on_step(done, loss)
        if evals:
            eval_loss = evaluate()

    merge = _merge(llm, projector, evals or train, pad_id, image_id, device, spec) if s2 else None
    if merge is not None:
        llm = merge.pop("model")
    if a.quantized_llm:  # the folder carries the source's own weights: the build quantizes them as above
        llm = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, trust_remote_code=False)
        if new_token:
            resize_embeddings(llm, len(tokenizer))
    result = TrainResult(
        adapter=str(out_dir / ALIGNED), method="align", steps=steps, examples=len(train),
        final_loss=history[-1]["loss"] if history else float("nan"),
        eval_loss=round(eval_loss, 6) if eval_loss is not None else None,
        train_tokens=tokens_run, tokens_per_s=round(tokens_run / max(seconds_run, 1e-9), 1),
        seconds=round(seconds_run, 1), resumed_from=start or None, peak_memory_mb=round(peak_memory_mb(torch), 1),
        target_modules=len(targets), trainable_params=sum(p.numel() for p in _trainable(llm, projector)),
        history=history,
    )
    training = {**result.to_dict(), "run_id": run_id, "stage1_steps": s1, "stage2_steps": s2,
                "quantized_llm": a.quantized_llm, "merge_check": merge, "base": str(Path(hf_dir).resolve())}
    with atomic_dir(out_dir / ALIGNED) as tmp:
        write_aligned(tmp, encoder, projector.cpu().eval(), llm.cpu(), tokenizer, image_token,
                      {k: v for k, v in training.items() if k != "history"})
        write_json(tmp / "training.json", training)
    shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)  # the aligned folder supersedes them
    console.print(f"[green]✓[/] aligned: final loss {result.final_loss:.4f}"
                  + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
                  + f", {result.tokens_per_s:.0f} tokens/s, {result.seconds:.0f} s")
    return result


def _tokens(tokens: int, encoder: Any, where: str) -> int:
    cells = encoder.grid[0] * encoder.grid[1]
    if math.isqrt(tokens) > min(encoder.grid):
        raise FinetuneError(f"{where}: finetune.align.projector.tokens: {tokens} is more than the encoder's "
                            f"{encoder.grid[0]}x{encoder.grid[1]} grid gives ({cells} cells)")
    return tokens


def _merge(llm, projector, examples, pad_id, image_id, device, spec: FinetuneSpec) -> dict[str, Any]:
    """Merge stage 2's LoRA into the LLM; its answer-position logits must not move beyond the
    merge tolerance on a few examples."""
    torch = require("torch", "train")
    batch = D.collate(examples[: min(8, len(examples))], pad_id)
    batch.pop("n_tokens")
    llm.eval()
    projector.eval()
    with torch.no_grad():
        before, _ = _logits_at_labels(llm, projector, batch, image_id, device)
        merged = llm.merge_and_unload()
        after, _ = _logits_at_labels(merged, projector, batch, image_id, device)
    diff = float((before - after).abs().max())
    if diff > spec.merge.tolerance:
        raise FinetuneError(f"merging the LoRA moved the logits by {diff:.3g} (finetune.merge.tolerance "
                            f"{spec.merge.tolerance})")
    return {"model": merged, "max_abs_diff": diff, "tolerance": spec.merge.tolerance}
