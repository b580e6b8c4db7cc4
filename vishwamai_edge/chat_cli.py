"""Terminal chat: stream replies from a bundle, one conversation; images with --image or /image."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from rich.console import Console

from .errors import InputError
from .runtime.backends import SamplingParams
from .runtime.constrained import read_schema_file
from .runtime.generation_stats import GenerationStats
from .runtime.media import MediaBudget, read_audio, read_image
from .runtime.options import RuntimeOptions
from .runtime.pipeline import Pipeline
from .runtime.session import ChatSession


def format_stats(s: GenerationStats) -> str:
    encoded = " and ".join(x for x in (f"{s.images} image(s)" if s.images else "",
                                       f"{s.audio_clips} audio clip(s)" if s.audio_clips else "") if x)
    images = f", {encoded} encoded in {s.encode_s * 1000:.0f} ms" if encoded else ""
    images += f", audio transcribed in {s.transcribe_s * 1000:.0f} ms" if s.heard else ""
    return (
        f"{s.prompt_tokens} prompt tokens{images}, {s.completion_tokens} generated, "
        f"first token {s.ttft_s * 1000:.0f} ms, {s.decode_tokens_per_s:.1f} tokens/s"
        + (f", {s.speculative} drafts accepted {s.accepted_tokens}/{s.drafted_tokens}" if s.speculative != "off" else "")
        + (" (stopped: length limit)" if s.finish_reason == "length" else "")
    )


class _Tee:
    """Writes to the terminal and keeps a copy (the reply's citations are read from it)."""

    def __init__(self, *outs) -> None:
        self.outs = outs

    def write(self, s: str) -> None:
        for o in self.outs:
            o.write(s)

    def flush(self) -> None:
        for o in self.outs:
            o.flush()


def stream_reply(session: ChatSession, text: str, out=sys.stdout, images=(), audio=(), err=None) -> GenerationStats:
    pieces = session.ask(text, images=images, audio=audio)
    first = next(pieces, None)  # the audio is heard before the first piece
    if err is not None and session.last_stats.heard:
        err.print(f"[dim]heard:[/] {' '.join(session.last_stats.heard)}", highlight=False)
    for piece in ([first] if first is not None else []):
        out.write(piece)
        out.flush()
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n")
    return session.last_stats


def run_chat(
    bundle: Path,
    options: RuntimeOptions,
    prompt: str | None,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
    show_stats: bool,
    images: list[Path] | None = None,
    audio: list[Path] | None = None,
    adapter: str | None = None,
    seed: int | None = None,
    json_schema: Path | None = None,
    docs: Path | str | None = None,
    top_k: int = 3,
) -> None:
    err = Console(stderr=True)
    schema = read_schema_file(json_schema) if json_schema is not None else None  # before loading the model
    with err.status("loading the bundle"):
        pipeline = Pipeline.load(bundle, options)
    retrieval = None
    if docs is not None:
        from .runtime.retrieval import Retrieval, sources_lines

        try:
            retrieval = Retrieval.open(docs, pipeline, top_k)
        except BaseException:
            pipeline.close()
            raise
    grammar = pipeline.compile_schema(schema, str(json_schema)) if json_schema is not None else None
    if pipeline.speculative is not None and grammar is not None:
        err.print("[yellow]note:[/] replies constrained to a schema decode without speculation", highlight=False)
    elif pipeline.speculative is not None and pipeline.speculative.note:
        err.print(f"[yellow]note:[/] {pipeline.speculative.note}", highlight=False)
    defaults = pipeline.bundle.runtime_defaults
    system_prompt = system if system is not None else defaults.system_prompt

    def new_session(system_text: str | None) -> ChatSession:
        return pipeline.session(
            system_prompt=system_text,
            sampling=SamplingParams(temperature=temperature if temperature is not None else defaults.temperature,
                                    seed=seed if seed is not None else 0),
            max_tokens=max_tokens or defaults.max_tokens,
            adapter=adapter,
            grammar=grammar,
        )

    session = new_session(system_prompt)

    pending: list = []  # images for the next turn
    pending_audio: list = []

    def one_turn(text: str) -> None:
        nonlocal session
        hits = None
        if retrieval is not None and text:
            # each question answered from its own sources, in a fresh conversation: a small context holds one set
            sources, hits = retrieval.ask(text, system_prompt)
            session = new_session(sources)
        reply = io.StringIO()
        stats = stream_reply(session, text, out=_Tee(sys.stdout, reply), images=tuple(pending),
                             audio=tuple(pending_audio), err=err)
        pending.clear()
        pending_audio.clear()
        if hits is not None:
            for line in sources_lines(reply.getvalue(), hits):
                sys.stdout.write(line + "\n")
        if show_stats:
            err.print(f"[dim]{format_stats(stats)}[/]")

    try:
        budget = MediaBudget(accepts=frozenset(pipeline.encoders))
        pending.extend(read_image(p, pipeline.encoders, budget) for p in images or [])
        pending_audio.extend(read_audio(p, pipeline.encoders, budget) for p in audio or [])
        if prompt is not None or pending_audio:
            one_turn(prompt or "")
            return
        interactive = sys.stdin.isatty()
        if interactive:
            images_hint = ", /image FILE attaches an image" if "image" in pipeline.encoders else ""
            err.print(f"[bold]{pipeline.bundle.name}[/] — /reset clears the conversation{images_hint}, "
                      "/exit or Ctrl-D quits")
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
            if text.startswith("/audio "):
                try:
                    pending_audio.append(read_audio(Path(text[len("/audio "):].strip()), pipeline.encoders))
                    err.print("[dim]audio attached to your next message[/]")
                except InputError as exc:
                    err.print(f"[red]error:[/] {exc}")
                continue
            if text.startswith("/image "):
                try:
                    pending.append(read_image(Path(text[len("/image "):].strip()), pipeline.encoders))
                    err.print("[dim]image attached to your next message[/]")
                except InputError as exc:
                    err.print(f"[red]error:[/] {exc}")
                continue
            try:
                one_turn(text)
            except InputError as exc:  # the conversation goes on after a bad turn
                err.print(f"[red]error:[/] {exc}")
    finally:
        if retrieval is not None:
            retrieval.close()
        pipeline.close()
