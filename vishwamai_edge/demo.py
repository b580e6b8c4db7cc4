"""`demo`: the whole path on the embedded model, start to finish, in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from .build import build
from .chat_cli import format_stats, stream_reply
from .recipe import EmbeddingsSpec, Recipe, load_recipe
from .runtime.options import RuntimeOptions
from .runtime.pipeline import Pipeline
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
    recipe = load_recipe(recipe_path) if recipe_path else Recipe(name="smollm2-135m", embeddings=EmbeddingsSpec())
    target = get_target("laptop-cpu")
    err.rule(f"1/{n} build {recipe.name} for {target.name}")
    result = build(recipe, target, out, n_threads=threads, console=err)
    err.rule(f"2/{n} ask the bundle")
    pipeline = Pipeline.load(result.bundle, RuntimeOptions(n_threads=threads))
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
    pipeline = Pipeline.load(bundle, RuntimeOptions(n_threads=threads))
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


# -- vision: a VLM made here from real weights, asked about pictures it never saw ------------------
VISION_RECIPE = Path("recipes/smollm2-135m-vision.yaml")
# recipes/smollm2-135m-vision.yaml without its comments (a test keeps them equal)
BUILTIN_VISION = {
    "name": "smollm2-135m-vision",
    "description": "SmolLM2-135M-Instruct + EfficientNet-Lite0 through a trained projector (shapes and colours)",
    "source": {"kind": "embedded"},
    "finetune": {
        "method": "align", "dataset": {"shapes": {"train": 900, "eval": 60, "seed": 0}},
        "align": {"encoder": {"kind": "efficientnet-lite0"}, "projector": {"depth": 2, "tokens": 16},
                  "stage2_steps": 0, "quantized_llm": "q4_k_m"},
        "max_seq_len": 256, "steps": 500, "batch_size": 8, "micro_batch_size": 8, "lr": 1.0e-3,
        "lr_schedule": "cosine", "warmup_steps": 10, "seed": 0, "eval_every": 50, "save_every": 50,
    },
    "export": {"gguf": {"outtype": "f16", "quants": ["q4_k_m"], "imatrix": False},
               "vision": {"dtype": "fp32", "mmproj": False}},
    "runtime": {"n_ctx": 512, "max_tokens": 16, "temperature": 0.0},
}


def vision_recipe() -> Recipe:
    return load_recipe(VISION_RECIPE) if VISION_RECIPE.is_file() else Recipe.model_validate(BUILTIN_VISION)


def shapes_accuracy(bundle: Path, eval_jsonl: Path, threads: int | None, on_answer=None) -> dict[str, Any]:
    """Ask the bundle every held-out question (a fresh conversation each) and score the answers:
    right when the answer names the true colour (or kind) and no other."""
    from .runtime.media import read_image
    from .train.shapes import held_out_questions, named

    pipeline = Pipeline.load(bundle, RuntimeOptions(n_threads=threads))
    scores: dict[str, list[bool]] = {"colour": [], "shape": []}
    try:
        for item in held_out_questions(eval_jsonl):
            pixels = read_image(item["image"], pipeline.encoders)
            answer = "".join(pipeline.session(max_tokens=16).ask(item["question"], images=[pixels])).strip()
            right = named(answer, item["attribute"]) == item["truth"]
            scores[item["attribute"]].append(right)
            if on_answer is not None:
                on_answer(item, answer, right)
    finally:
        pipeline.close()
    return {k: {"right": sum(v), "asked": len(v), "accuracy": sum(v) / max(len(v), 1)} for k, v in scores.items()}


def run_vision_demo(out: Path, threads: int | None, show: int = 12) -> dict[str, Any]:
    """Align EfficientNet-Lite0 to the embedded SmolLM2 on the shapes set, build the Q4_K_M + ONNX
    bundle, and ask it about held-out pictures, each answer printed next to the truth."""
    err = Console(stderr=True)
    recipe = vision_recipe()
    target = get_target("laptop-cpu")
    err.rule(f"1/2 align and build {recipe.name} for {target.name}")
    result = build(recipe, target, out, n_threads=threads, console=err)
    eval_jsonl = Path(out) / recipe.name / "finetune" / "shapes" / "eval.jsonl"
    err.rule("2/2 ask the bundle about pictures of colour-and-shape pairs it was never trained on")
    shown = [0]

    def on_answer(item, answer, right):
        if shown[0] < show:
            shown[0] += 1
            print(f"{item['image'].name}: {item['question']} -> {answer!r} "
                  f"(truth: {item['truth']}) {'✓' if right else '✗'}", flush=True)

    scores = shapes_accuracy(result.bundle, eval_jsonl, threads, on_answer)
    for attribute, s in scores.items():
        err.print(f"{attribute}: {s['right']}/{s['asked']} right ({s['accuracy']:.0%}) on held-out pictures")
    err.print(f"[bold green]bundle:[/] {result.bundle}  (try: vishwamai-edge ui {result.bundle})")
    return scores
