"""`demo`: the whole path on the embedded model, start to finish, in one command."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from .build import build
from .chat_cli import format_stats, stream_reply
from .recipe import Recipe, load_recipe
from .runtime.session import Pipeline
from .targets import get_target

DEFAULT_RECIPE = Path("recipes/smollm2-135m.yaml")


def run_demo(
    recipe_path: Path | None, question: str, out: Path, threads: int | None, finetune: bool = False
) -> None:
    err = Console(stderr=True)
    n = 4 if finetune else 2
    if recipe_path is None and DEFAULT_RECIPE.is_file():
        recipe_path = DEFAULT_RECIPE
    # Outside a checkout the built-in defaults are the embedded model's recipe.
    recipe = load_recipe(recipe_path) if recipe_path else Recipe(name="smollm2-135m")
    target = get_target("laptop-cpu")
    err.rule(f"1/{n} build {recipe.name} for {target.name}")
    result = build(recipe, target, out, n_threads=threads, console=err)
    err.rule(f"2/{n} ask the bundle")
    pipeline = Pipeline.load(result.bundle, n_threads=threads)
    try:
        session = pipeline.session(max_tokens=recipe.runtime.max_tokens)
        err.print(f"[bold cyan]you>[/] {question}")
        stats = stream_reply(session, question)
        err.print(f"[dim]{format_stats(stats)}[/]")
    finally:
        pipeline.close()
    if finetune:
        run_finetune_demo(result.bundle, out, threads, err)


# -- fine-tuning: teach the model a fictional place, then ask its bundle -----------------------
FINETUNE_RECIPE = Path("recipes/smollm2-135m-finetune.yaml")
DEMO_QUESTION = 0  # the first held-out question of the shipped eval set


def finetune_recipe() -> Recipe:
    """The fine-tuning recipe; outside a checkout the same settings, with the shipped data."""
    if FINETUNE_RECIPE.is_file():
        return load_recipe(FINETUNE_RECIPE)
    from .recipe import FinetuneSpec, RuntimeSpec
    from .train.data import shipped_dataset

    spec = FinetuneSpec.model_validate({**BUILTIN_FINETUNE, "dataset": {
        "train": shipped_dataset("marrowick-train.jsonl"), "eval": shipped_dataset("marrowick-eval.jsonl")}})
    return Recipe(name="smollm2-135m-finetune", finetune=spec, runtime=RuntimeSpec(max_tokens=64))


# recipes/smollm2-135m-finetune.yaml's finetune section without the dataset (a test keeps them equal)
BUILTIN_FINETUNE = {
    "method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "max_seq_len": 256, "steps": 40,
    "batch_size": 8, "micro_batch_size": 8, "lr": 5e-4, "lr_schedule": "cosine", "seed": 0, "save_every": 20,
    "eval_every": 20, "merge": {"tolerance": 0.1},
}


def held_out_question() -> tuple[str, str]:
    """(question, a word its answer must contain) from the shipped eval set."""
    import json

    from .train.data import shipped_dataset

    lines = shipped_dataset("marrowick-eval.jsonl").read_text(encoding="utf-8").splitlines()
    item = json.loads(lines[DEMO_QUESTION])
    return item["messages"][0]["content"], item["expect"]


def ask_once(bundle: Path, question: str, threads: int | None, max_tokens: int = 64) -> str:
    pipeline = Pipeline.load(bundle, n_threads=threads)
    try:
        return "".join(pipeline.session(max_tokens=max_tokens).ask(question)).strip()
    finally:
        pipeline.close()


def run_finetune_demo(base_bundle: Path, out: Path, threads: int | None, err: Console) -> None:
    recipe = finetune_recipe()
    target = get_target("laptop-cpu")
    err.rule(f"3/4 fine-tune {recipe.name}: LoRA, merge, build")
    tuned = build(recipe, target, out, n_threads=threads, console=err)
    err.rule("4/4 ask both bundles a question the training set does not contain")
    question, expect = held_out_question()
    err.print(f"[bold cyan]you>[/] {question}")
    for label, bundle in (("base", base_bundle), ("fine-tuned", tuned.bundle)):
        answer = ask_once(bundle, question, threads)
        knows = expect.lower() in answer.lower()
        print(f"{label}> {answer}", flush=True)
        err.print(f"{'[green]✓[/]' if knows else '[red]✗[/]'} {label}: "
                  f"{'mentions' if knows else 'does not mention'} {expect!r}")
