"""Merge a LoRA adapter into its base: a plain HF folder that any exporter reads.

The base is reloaded unquantized (fp32 on a CPU, its 16-bit dtype on a GPU), also for a
QLoRA adapter: merging into NF4 weights would round the update away. The merged folder
is saved in the base's own dtype, then reloaded and checked: its last-token logits
against base + adapter (unmerged) on a few prompts, within the recipe's tolerance. The
numbers are written to merged/merge_check.json.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from ..errors import SourceError, peft_on_transformers, quiet_transformers, require
from ..fsutil import atomic_dir, write_json
from .lora import FinetuneError, model_class

# Files of an HF folder that are not weights or model config: tokenizer, chat template, processor.
_SKIP = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_WRITTEN_BY_SAVE = ("config.json", "generation_config.json", "source.json")
CHECK_FILE = "merge_check.json"


@dataclass
class MergeCheck:
    prompts: int
    max_abs_diff: float  # last-token logits, merged (as saved) vs base + adapter unmerged
    top1_agreement: float
    tolerance: float
    saved_dtype: str
    merged_in: str  # the dtype the base was reloaded in for the merge
    adapter_method: str

    def to_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def adapter_base(adapter_dir: Path) -> Path:
    cfg = Path(adapter_dir) / "adapter_config.json"
    if not cfg.is_file():
        raise SourceError(f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json)")
    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise SourceError(f"{cfg} does not name its base model; pass --base")
    return Path(base)


def merge_adapter(
    adapter_dir: Path,
    out_dir: Path,
    base_dir: Path | None = None,
    prompts: list[str] | None = None,
    tolerance: float = 0.1,
    console: Console | None = None,
) -> MergeCheck:
    torch = require("torch", "build")
    transformers = quiet_transformers()
    peft = require("peft", "train")
    from ..recipe import DEFAULT_VERIFY_PROMPTS
    from ..sources.folders import check_hf_dir

    console = console or Console(stderr=True)
    adapter_dir = Path(adapter_dir)
    base_dir = check_hf_dir(Path(base_dir) if base_dir else adapter_base(adapter_dir))
    prompts = prompts or list(DEFAULT_VERIFY_PROMPTS)
    method = _adapter_method(adapter_dir)

    config = transformers.AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    saved = _saved_dtype(config, torch)
    cuda = torch.cuda.is_available()
    merge_dtype = saved if cuda and saved != torch.float32 else torch.float32
    device = "cuda" if cuda else "cpu"
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False)

    with console.status(f"merging {adapter_dir.name} into {base_dir.name} ({_name(merge_dtype)})"):
        base = model_class(config).from_pretrained(base_dir, dtype=merge_dtype).to(device)
        with peft_on_transformers():
            model = peft.PeftModel.from_pretrained(base, adapter_dir)
        model.eval()
        want = _last_logits(model, tokenizer, prompts, torch)
        merged = model.merge_and_unload()
        merged.to(saved)
        with atomic_dir(out_dir) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            _copy_tokenizer_files(base_dir, tmp)
            del merged, model, base
            # check the folder as written: rounding to the saved dtype included
            reloaded = model_class(config).from_pretrained(tmp, dtype=merge_dtype).to(device).eval()
            got = _last_logits(reloaded, tokenizer, prompts, torch)
            diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
            top1 = sum(int(g.argmax() == w.argmax()) for g, w in zip(got, want)) / len(prompts)
            check = MergeCheck(len(prompts), diff, top1, tolerance, _name(saved), _name(merge_dtype), method)
            if diff > tolerance or top1 < 1.0:
                raise FinetuneError(
                    f"the merged model does not match base + adapter: max |logit diff| {diff:.4g} "
                    f"(tolerance {tolerance}), top-1 agreement {top1:.0%}"
                )
            write_json(tmp / CHECK_FILE, check.to_dict())
    console.print(f"[green]✓[/] merged into {out_dir}: max |Δlogit| {diff:.4g} vs base + adapter, top-1 {top1:.0%}")
    return check


def _last_logits(model, tokenizer, prompts: list[str], torch) -> list:
    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt")["input_ids"].to(device)
            out.append(model(input_ids=ids).logits[0, -1].float().cpu())
    return out


def _saved_dtype(config, torch):
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    return dtype


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _adapter_method(adapter_dir: Path) -> str:
    info = adapter_dir / "training.json"
    return json.loads(info.read_text()).get("method", "lora") if info.is_file() else "lora"


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if not item.is_file() or item.name.startswith(".") or item.name in _WRITTEN_BY_SAVE:
            continue
        if item.name.endswith(_SKIP):
            continue
        shutil.copy2(item, dst / item.name)


def merge_command(
    recipe_path: Path | None,
    adapter: Path | None,
    base: Path | None,
    out: Path | None,
    out_root: Path = Path("build"),
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> Path:
    """`vishwamai-edge merge`: a recipe's adapter (build/<recipe>/finetune/adapter -> merged/),
    or any adapter folder given with --adapter and --out."""
    from ..errors import UserError
    from ..recipe import MergeSpec, load_recipe

    spec = MergeSpec()
    if recipe_path is not None:
        recipe = load_recipe(recipe_path, overrides)
        spec = recipe.finetune.merge if recipe.finetune else spec
        root = Path(out_root) / recipe.name
        adapter = adapter or root / "finetune" / "adapter"
        out = out or root / "merged"
        if not adapter.is_dir():
            raise UserError(f"no adapter at {adapter}; run: vishwamai-edge finetune --recipe {recipe_path}")
    elif adapter is None or out is None:
        raise UserError("merge needs --recipe, or --adapter and --out")
    merge_adapter(adapter, out, base, spec.prompts, spec.tolerance, console)
    return out
