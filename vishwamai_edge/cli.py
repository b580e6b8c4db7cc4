"""The `vishwamai-edge` command. Each subcommand parses its flags and calls one function.

A `UserError` from the library becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import UserError

app = typer.Typer(
    name="vishwamai-edge",
    help="Take an open LLM or VLM from a workstation to an edge device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)

DEFAULT_RECIPE = Path("recipes/smollm2-135m.yaml")


@app.command()
def build(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="recipe YAML file")],
    target: Annotated[str, typer.Option("--target", "-t", help="target profile, e.g. laptop-cpu, orin-nx-16")] = "laptop-cpu",
    quant: Annotated[Optional[str], typer.Option(help="GGUF type of the bundle (q4_k_m, q5_k_m, q8_0, f16); default: the target's")] = None,
    out: Annotated[Path, typer.Option(help="output root")] = Path("build"),
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for checks and quantization")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe field: field.path=value")] = None,
) -> None:
    """Build a device bundle from a recipe (resumable: finished stages are skipped)."""
    from .build import build as run_build
    from .recipe import load_recipe
    from .targets import get_target

    result = run_build(load_recipe(recipe, set_), get_target(target), out, quant, threads, console=err)
    typer.echo(str(result.bundle))


@app.command()
def chat(
    bundle: Annotated[Path, typer.Argument(help="bundle folder (or a .gguf file)")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="ask once, print the answer, exit")] = None,
    system: Annotated[Optional[str], typer.Option(help="system prompt")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="reply length limit")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="0 = greedy")] = None,
    n_ctx: Annotated[Optional[int], typer.Option(help="context length")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads")] = None,
    stats: Annotated[bool, typer.Option(help="print time to first token and tokens/s after each reply")] = True,
) -> None:
    """Chat with a bundle in the terminal, streaming. /reset clears the conversation, /exit quits."""
    from .chat_cli import run_chat

    run_chat(bundle, prompt, system, max_tokens, temperature, n_ctx, threads, stats)


@app.command()
def demo(
    recipe: Annotated[Optional[Path], typer.Option(help="recipe; default: the embedded SmolLM2-135M-Instruct")] = None,
    question: Annotated[str, typer.Option(help="the question asked")] = "What is the capital of France?",
    out: Annotated[Path, typer.Option(help="output root")] = Path("build"),
    threads: Annotated[Optional[int], typer.Option(help="CPU threads")] = None,
) -> None:
    """Embedded model -> GGUF -> checked -> Q4_K_M bundle -> one question answered, with tokens/s."""
    from .demo import run_demo

    run_demo(recipe, question, out, threads)


@app.command()
def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    quiet: Annotated[bool, typer.Option(help="print nothing; exit 0 if an LLM backend works, else 1")] = False,
) -> None:
    """What is installed here, which backends work, and which target profile fits."""
    import json

    from . import doctor as doc

    report = doc.collect()
    if quiet:
        raise typer.Exit(0 if doc.any_llm_backend(report) else 1)
    if json_out:
        typer.echo(json.dumps(doc.to_json(report), indent=2))
    else:
        doc.render(report, Console())


def main(argv: list[str] | None = None) -> None:
    import click

    command = typer.main.get_command(app)
    try:
        rc = command.main(args=argv, prog_name="vishwamai-edge", standalone_mode=False)
    except UserError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.ClickException as exc:  # bad flags: click's own message, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        err.print("interrupted")
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
