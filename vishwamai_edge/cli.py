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

from .errors import InputError, UserError
from .runtime.backends import MIN_CTX

# The run-time options, declared once: chat, ui, serve and profile take them and build one RuntimeOptions
NCtx = Annotated[Optional[int], typer.Option(min=MIN_CTX, help="context tokens, shared evenly by the --parallel slots "
                                             "(default: the bundle's context for each)")]
Threads = Annotated[Optional[int], typer.Option(min=1, help="CPU threads (default: physical cores)")]
Parallel = Annotated[Optional[int], typer.Option(min=1, help="requests decoded together, one context slot each "
                                                 "(default: the bundle's target's)")]
Speculative = Annotated[Optional[str], typer.Option(help=(
    "speculative decoding, lossless, one request at a time: lookup (drafts from n-grams of the conversation) or "
    "draft (a smaller GGUF of the same vocabulary, --draft); default: the bundle's, else off"))]
Draft = Annotated[Optional[Path], typer.Option(help="draft model GGUF for --speculative draft (same vocabulary as the "
                                               "bundle's model)")]
DraftMax = Annotated[Optional[int], typer.Option(min=1, max=64, help="draft tokens verified per step at most (default: "
                                                 "the bundle's target's, 3 on laptop-cpu, 8 elsewhere)")]
KvType = Annotated[Optional[str], typer.Option("--kv-type", help="KV-cache type: f16, q8_0 or q4_0 (quantized types "
                                               "turn on flash attention; default: the bundle's)")]


def _options(n_ctx: int | None, threads: int | None, parallel: int | None = None, speculative: str | None = None,
             draft: Path | None = None, draft_max: int | None = None, kv_type: str | None = None):
    """The flags as one RuntimeOptions; a bad --kv-type or --speculative fails before any model loads."""
    from .runtime.kv_cache import kv_type as check_kv_type
    from .runtime.options import RuntimeOptions
    from .runtime.speculative import resolve_options

    given = speculative is not None or draft is not None or draft_max is not None
    return RuntimeOptions(n_ctx=n_ctx, n_threads=threads, parallel=parallel,
                          speculative=resolve_options(speculative, draft, draft_max) if given else None,
                          kv_type=check_kv_type(kv_type).name if kv_type is not None else None)


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
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads for checks and quantization")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe field: field.path=value")] = None,
    add_to: Annotated[Optional[Path], typer.Option("--add-to", help="instead: add the recipe's LoRA fine-tune to this existing bundle as an adapter (the base untouched)")] = None,
) -> None:
    """Build a device bundle from a recipe (resumable: finished stages are skipped)."""
    from .recipe import load_recipe

    if add_to is not None:
        from .adapters import add_adapter

        added = add_adapter(load_recipe(recipe, set_), add_to, out, threads, console=err)
        typer.echo(f"{added.bundle} {added.name}")
        return
    from .build import build as run_build
    from .targets import get_target

    result = run_build(load_recipe(recipe, set_), get_target(target), out, quant, threads, console=err)
    typer.echo(str(result.bundle))


@app.command()
def chat(
    bundle: Annotated[Path, typer.Argument(help="bundle folder (or a .gguf file)")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="ask once, print the answer, exit")] = None,
    system: Annotated[Optional[str], typer.Option(help="system prompt")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(min=1, help="reply length limit")] = None,
    temperature: Annotated[Optional[float], typer.Option(min=0.0, max=2.0, help="0 = greedy")] = None,
    n_ctx: NCtx = None,
    threads: Threads = None,
    stats: Annotated[bool, typer.Option(help="print time to first token and tokens/s after each reply")] = True,
    image: Annotated[Optional[list[Path]], typer.Option("--image", "-i", help="image file for the first message (repeatable)")] = None,
    audio: Annotated[Optional[list[Path]], typer.Option("--audio", "-a", help="spoken question (WAV) for the first message; heard, then answered")] = None,
    adapter: Annotated[Optional[str], typer.Option("--adapter", help="apply this LoRA adapter of the bundle (its manifest's adapters)")] = None,
    speculative: Speculative = None,
    draft: Draft = None,
    draft_max: DraftMax = None,
    seed: Annotated[Optional[int], typer.Option(help="random seed of sampled replies (temperature > 0)")] = None,
    kv_type: KvType = None,
    json_schema: Annotated[Optional[Path], typer.Option("--json-schema", help="every reply is JSON valid under the JSON schema in this file (any object: {\"type\": \"object\"})")] = None,
    docs: Annotated[Optional[str], typer.Option("--docs", help="answer from this document index (vishwamai-edge index), citing its sources; each question stands alone")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=20, help="with --docs: chunks retrieved per question")] = 3,
) -> None:
    """Chat with a bundle in the terminal, streaming. /image FILE attaches an image, /reset clears, /exit quits."""
    from .chat_cli import run_chat

    options = _options(n_ctx, threads, 1, speculative, draft, draft_max, kv_type)  # one conversation: one slot
    run_chat(bundle, options, prompt, system, max_tokens, temperature, stats, image, audio, adapter, seed=seed,
             json_schema=json_schema, docs=docs, top_k=top_k)


@app.command()
def demo(
    recipe: Annotated[Optional[Path], typer.Option(help="recipe; default: the embedded SmolLM2-135M-Instruct")] = None,
    question: Annotated[str, typer.Option(help="the question asked")] = "What is the capital of France?",
    out: Annotated[Path, typer.Option(help="output root")] = Path("build"),
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads")] = None,
    finetune: Annotated[bool, typer.Option("--finetune/--no-finetune", help="then teach it a fictional place with LoRA (a few minutes) and ask both bundles")] = True,
    vision: Annotated[bool, typer.Option("--vision", help="instead: give the embedded model eyes (EfficientNet-Lite0 + a projector trained here, about 13 minutes on 2 cores) and ask it about pictures it never saw")] = False,
) -> None:
    """Embedded model -> GGUF -> checked -> Q4_K_M bundle -> one question answered, with tokens/s;
    then LoRA fine-tuning on a shipped set -> merged -> bundle that knows what it was taught.
    With --vision: align an image encoder to it, build the image bundle, ask about held-out pictures."""
    if vision:
        from .demo import run_vision_demo

        run_vision_demo(out, threads)
        return
    from .demo import run_demo

    run_demo(recipe, question, out, threads, finetune)


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


@app.command()
def ui(
    bundle: Annotated[Path, typer.Argument(help="bundle folder (or a .gguf file)")],
    host: Annotated[str, typer.Option(help="address to bind; 0.0.0.0 exposes the page to the network")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port")] = 7860,
    n_ctx: NCtx = None,
    threads: Threads = None,
    max_queue: Annotated[int, typer.Option(min=1, help="chat turns allowed to wait for the model")] = 16,
    max_file_mb: Annotated[float, typer.Option(help="upload size limit (MB)")] = 10,
    parallel: Parallel = None,
    speculative: Speculative = None,
    draft: Draft = None,
    draft_max: DraftMax = None,
    kv_type: KvType = None,
    docs: Annotated[Optional[str], typer.Option("--docs", help="answer each question from this document index (vishwamai-edge index), sources under the reply")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=20, help="with --docs: chunks retrieved per question")] = 3,
) -> None:
    """Local web chat (Gradio): streaming, image/audio inputs, sampling controls, stop, live stats. Offline."""
    from .ui.app import run_ui

    run_ui(bundle, _options(n_ctx, threads, parallel, speculative, draft, draft_max, kv_type), host, port, max_queue,
           max_file_mb, docs=docs, top_k=top_k)


@app.command()
def serve(
    bundle: Annotated[Path, typer.Argument(help="bundle folder (or a .gguf file)")],
    host: Annotated[str, typer.Option(help="address to bind; 0.0.0.0 exposes the API to the network")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="VISHWAMAI_EDGE_API_KEY", show_envvar=True,
                                                   help="require 'Authorization: Bearer KEY'")] = None,
    n_ctx: NCtx = None,
    threads: Threads = None,
    max_queue: Annotated[int, typer.Option(min=1, help="requests allowed to wait for a slot; more get 503")] = 16,
    max_request_mb: Annotated[float, typer.Option(help="request body limit (MiB)")] = 20,
    with_ui: Annotated[bool, typer.Option("--ui/--no-ui", help="also serve the web chat at /ui, same model")] = False,
    parallel: Parallel = None,
    speculative: Speculative = None,
    draft: Draft = None,
    draft_max: DraftMax = None,
    kv_type: KvType = None,
    docs: Annotated[Optional[str], typer.Option("--docs", help="a document index (vishwamai-edge index): chat requests with \"docs\": true are answered from it, with their sources")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=20, help="with --docs: chunks retrieved per question")] = 3,
) -> None:
    """OpenAI-compatible HTTP API: /v1/chat/completions (streaming or not), /v1/embeddings, /v1/models, /health."""
    from .serve.server import run_server

    run_server(bundle, _options(n_ctx, threads, parallel, speculative, draft, draft_max, kv_type), host, port, api_key,
               max_queue, max_request_mb, with_ui, docs=docs, top_k=top_k)


@app.command()
def profile(
    bundles: Annotated[list[Path], typer.Argument(help="bundle folders (or .gguf files) to profile and compare")],
    out: Annotated[Path, typer.Option(help="report folder: report.json, report.md, report.html, plots/")] = Path("build/profiles/latest"),
    scenarios: Annotated[Optional[str], typer.Option(help="comma-separated: chat, prompt-512, prompt-1024, prompt-2048, image, audio, speculative, concurrency, overhead; or all, short")] = None,
    repeat: Annotated[int, typer.Option(min=1, help="measured runs per scenario")] = 3,
    warmup: Annotated[int, typer.Option(min=0, help="unmeasured runs before them")] = 1,
    threads: Threads = None,
    n_ctx: Annotated[Optional[int], typer.Option(min=MIN_CTX, help="context length (default: the smallest that fits the scenarios)")] = None,
    target: Annotated[Optional[str], typer.Option(help="target profile of this machine, for the roofline's peak bandwidth (default: the Jetson module found, else the bundle's target)")] = None,
    decode_tokens: Annotated[int, typer.Option(min=1, help="tokens generated per run")] = 64,
    kv_type: KvType = None,
) -> None:
    """Latency and memory of bundles on this machine: scenarios, medians, plots, one report to compare."""
    from .profile import run_profile

    result = run_profile(bundles, out, scenarios, repeat, warmup, _options(n_ctx, threads, kv_type=kv_type), target,
                         decode_tokens, console=err)
    typer.echo(str(result.out_dir / "report.md"))


@app.command(name="eval")
def eval_(
    bundles: Annotated[list[Path], typer.Argument(help="bundle folders (or .gguf files) of one model; the first is the reference (an HF folder there: converted to F16 as the build converts it)")],
    text: Annotated[Optional[Path], typer.Option(help="UTF-8 text to score (default: the shipped eval-text.txt)")] = None,
    n_ctx: Annotated[int, typer.Option(min=MIN_CTX, help="window length in tokens; the second half of each is scored")] = 512,
    tasks: Annotated[Optional[Path], typer.Option(help="JSONL questions with answers (exact, contains, choices; images allowed): accuracy per bundle")] = None,
    kv_variant: Annotated[Optional[list[str]], typer.Option("--kv-variant", help="also run the reference's weights with this KV-cache type (q8_0, q4_0), a row each")] = None,
    threads: Threads = None,
    kv_type: KvType = None,
    out: Annotated[Path, typer.Option(help="report folder: report.json, report.md, report.html, plots/")] = Path("build/eval/latest"),
) -> None:
    """What quantization cost: perplexity over a text and, against the first bundle, the KL divergence of
    every token's distribution, same-top-token rate and Δp, as llama-perplexity reports them; with
    --tasks, the accuracy on questions."""
    from .eval.runner import eval_rows, run_eval
    from .runtime.kv_cache import kv_type as check_kv_type

    bundles = [_hf_reference(bundles[0], out), *bundles[1:]] if bundles else bundles
    rows = eval_rows(bundles, check_kv_type(kv_type).name if kv_type else None,
                     [check_kv_type(kv).name for kv in kv_variant or []])
    result = run_eval(rows, out, text, n_ctx, _options(None, threads), tasks, console=err)
    typer.echo(str(result.out_dir / "report.md"))


def _hf_reference(path: Path, out: Path) -> Path:
    """A text model's HF folder as eval's reference: its F16 GGUF (converted once into the report folder, again
    when the folder changes). A bundle or GGUF file is returned as it is."""
    if not (path.is_dir() and (path / "config.json").is_file() and not (path / "manifest.json").is_file()):
        return path
    from .export.gguf import convert_hf_to_gguf
    from .families import family_for
    from .fsutil import sha256_json
    from .stages.stamps import cached_result, folder_fingerprint, mark_done

    if family_for(path).name != "text":
        raise InputError(f"{path}: an HF folder as eval's reference must be a text model; give the language "
                         "model's F16 GGUF (build/<recipe>/export/model-f16.gguf)")
    gguf = out / "reference" / "model-f16.gguf"
    inputs = sha256_json([str(path.resolve()), folder_fingerprint(path, recursive=True)])
    if cached_result(gguf, inputs) is None:
        gguf.parent.mkdir(parents=True, exist_ok=True)
        with err.status(f"converting {path} to an F16 GGUF (the reference)"):
            convert_hf_to_gguf(path, gguf, "f16")
        mark_done(gguf, inputs, {})
    return gguf


@app.command()
def index(
    docs: Annotated[list[Path], typer.Argument(help="documents or folders of them (.txt .md .html .pdf)")],
    bundle: Annotated[Path, typer.Option("--bundle", "-b", help="a bundle with an embedding model")],
    out: Annotated[str, typer.Option("--out", "-o", help="the index file (created, or brought up to date), or a PostgreSQL URL with pgvector (postgresql://USER@HOST:PORT/DB)")],
    chunk_tokens: Annotated[Optional[int], typer.Option(min=16, help="tokens per chunk (default: the model's window less a margin)")] = None,
    overlap: Annotated[int, typer.Option(min=0, help="tokens shared by consecutive chunks")] = 32,
    threads: Threads = None,
) -> None:
    """Embed local documents into an index the bundle can answer from: new and changed files are embedded, unchanged
    ones kept, deleted ones dropped; an unreadable file is skipped with a warning naming it."""
    from .runtime.doc_index import build_index

    build_index(docs, bundle, out, chunk_tokens, overlap, threads, console=err)


@app.command()
def finetune(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="recipe YAML file with a finetune section")],
    method: Annotated[Optional[str], typer.Option(help="lora, qlora (needs CUDA), cpt (raw text), align (image encoder + projector), grpo (rewards) or distill (a teacher's distributions); default: the recipe's")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the last checkpoint")] = False,
    merge: Annotated[bool, typer.Option(help="merge the adapter into the base as well (build/<recipe>/merged)")] = True,
    out: Annotated[Path, typer.Option(help="output root")] = Path("build"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe field: field.path=value")] = None,
) -> None:
    """Fine-tune with LoRA / QLoRA on a JSONL chat set (or continue pre-training, GRPO with rewards, distill from a
    teacher): an adapter, then merged, or with finetune.full the whole model. A prune section first cuts the source
    into a smaller student. With method align: an aligned vision-language folder (encoder, trained projector, LLM)."""
    from .recipe import load_recipe
    from .stages.finetune import finetune_and_merge

    overrides = [*(set_ or []), *([f"finetune.method={method}"] if method else [])]
    typer.echo(str(finetune_and_merge(load_recipe(recipe, overrides), out, resume=resume, merge=merge, console=err)))


@app.command()
def merge(
    recipe: Annotated[Optional[Path], typer.Option("--recipe", "-r", help="merge this recipe's adapter (build/<recipe>/finetune/adapter)")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="a LoRA adapter folder")] = None,
    base: Annotated[Optional[Path], typer.Option(help="base HF folder; default: the one the adapter names")] = None,
    out: Annotated[Optional[Path], typer.Option(help="merged HF folder; default with --recipe: build/<recipe>/merged")] = None,
    out_root: Annotated[Path, typer.Option(help="build root, with --recipe")] = Path("build"),
) -> None:
    """Adapter + base -> plain HF folder, checked: merged logits against base + adapter."""
    from .train.merge import merge_command

    typer.echo(str(merge_command(recipe, adapter, base, out, out_root, console=err)))


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage errors, aborts) of every click that may be parsing: typer 0.29+ raises the
    exceptions of its own vendored copy of click, older typer those of the click package."""
    import click

    usage, aborts = [click.ClickException], [click.exceptions.Abort]
    try:
        from typer._click.exceptions import ClickException
    except ImportError:
        pass
    else:
        usage.append(ClickException)
    if isinstance(getattr(typer, "Abort", None), type):
        aborts.append(typer.Abort)
    return tuple(usage), tuple(aborts)


def _attach_usage(exc, command, argv: list[str]) -> None:
    """Some parser errors ('--recipe' with no value) come without a context, so click would
    print no usage line: give them the subcommand's."""
    if getattr(exc, "ctx", True) is not None or not hasattr(exc, "ctx"):
        return
    root = command.context_class(command, info_name="vishwamai-edge")
    sub = command.get_command(root, argv[0]) if argv else None
    exc.ctx = sub.context_class(sub, info_name=argv[0], parent=root) if sub is not None else root


def main(argv: list[str] | None = None) -> None:
    usage_errors, aborts = _click_exceptions()
    command = typer.main.get_command(app)
    try:
        rc = command.main(args=argv, prog_name="vishwamai-edge", standalone_mode=False)
    except UserError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except usage_errors as exc:  # bad flags or values: click's usage line and message, exit 2
        _attach_usage(exc, command, sys.argv[1:] if argv is None else argv)
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, *aborts):
        err.print("interrupted")
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
