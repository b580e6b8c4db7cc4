"""Terminal chat: stream replies from a bundle, one conversation."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from .runtime.backends import SamplingParams
from .runtime.session import ChatSession, GenerationStats, Pipeline


def format_stats(s: GenerationStats) -> str:
    return (
        f"{s.prompt_tokens} prompt tokens, {s.completion_tokens} generated, "
        f"first token {s.ttft_s * 1000:.0f} ms, {s.decode_tokens_per_s:.1f} tokens/s"
        + (" (stopped: length limit)" if s.finish_reason == "length" else "")
    )


def stream_reply(session: ChatSession, text: str, out=sys.stdout) -> GenerationStats:
    for piece in session.ask(text):
        out.write(piece)
        out.flush()
    out.write("\n")
    return session.last_stats


def run_chat(
    bundle: Path,
    prompt: str | None,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
    n_ctx: int | None,
    threads: int | None,
    show_stats: bool,
) -> None:
    err = Console(stderr=True)
    with err.status("loading the bundle"):
        pipeline = Pipeline.load(bundle, n_ctx=n_ctx, n_threads=threads)
    defaults = pipeline.bundle.runtime_defaults
    session = pipeline.session(
        system_prompt=system if system is not None else defaults.get("system_prompt"),
        sampling=SamplingParams(temperature=temperature if temperature is not None else defaults.get("temperature", 0.0)),
        max_tokens=max_tokens or defaults.get("max_tokens", 512),
    )

    def one_turn(text: str) -> None:
        stats = stream_reply(session, text)
        if show_stats:
            err.print(f"[dim]{format_stats(stats)}[/]")

    try:
        if prompt is not None:
            one_turn(prompt)
            return
        interactive = sys.stdin.isatty()
        if interactive:
            err.print(f"[bold]{pipeline.bundle.name}[/] — /reset clears the conversation, /exit or Ctrl-D quits")
        while True:
            if interactive:
                err.print("[bold cyan]you>[/] ", end="")
            line = sys.stdin.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                session.reset()
                err.print("[dim]conversation cleared[/]")
                continue
            one_turn(text)
    finally:
        pipeline.close()
