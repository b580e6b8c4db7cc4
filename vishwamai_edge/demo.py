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


def run_demo(recipe_path: Path | None, question: str, out: Path, threads: int | None) -> None:
    err = Console(stderr=True)
    if recipe_path is None and DEFAULT_RECIPE.is_file():
        recipe_path = DEFAULT_RECIPE
    # Outside a checkout the built-in defaults are the embedded model's recipe.
    recipe = load_recipe(recipe_path) if recipe_path else Recipe(name="smollm2-135m")
    target = get_target("laptop-cpu")
    err.rule(f"1/2 build {recipe.name} for {target.name}")
    result = build(recipe, target, out, n_threads=threads, console=err)
    err.rule("2/2 ask the bundle")
    pipeline = Pipeline.load(result.bundle, n_threads=threads)
    try:
        session = pipeline.session(max_tokens=recipe.runtime.max_tokens)
        err.print(f"[bold cyan]you>[/] {question}")
        stats = stream_reply(session, question)
        err.print(f"[dim]{format_stats(stats)}[/]")
    finally:
        pipeline.close()
