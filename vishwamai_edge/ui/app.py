"""`vishwamai-edge ui`: a local Gradio chat page on the shared `Engine`.

Offline by construction: telemetry, the version check and run history off, no share link,
the bundled fonts only, bound to 127.0.0.1 (and answering only loopback Host names) unless
told otherwise; files are read only from gradio's upload folder (guard.py). Gradio's queue
lets one chat turn at a time reach the engine; uploads have a size limit.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UserError, require
from ..runtime.backends import SamplingParams
from ..runtime.engine import ChatRequest, Engine, Generation, Message, RequestStats
from ..runtime.media import ImagePart, MediaBudget, Part, TextPart, audio_part, decode_data_url, image_part
from ..runtime.options import RuntimeOptions
from .guard import OfflineMiddleware, accept_uploads_only, is_uploaded

DEFAULT_MAX_FILE_MB = 10
UPDATE_EVERY_S = 0.05  # batch streamed pieces: one browser update per 50 ms, not one per token
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
HEARD = "🎤 heard: "  # a user message that had audio starts with what the device heard
HEARD_NOTHING = "🎤 heard nothing"
LISTENING = "🎤 listening…"
AUDIO_ROWS = "🎤 audio, heard by the model itself"  # embeddings bundles: there is no transcript to show


def import_gradio():
    """gradio with telemetry and its version check switched off (it reads the variable at launch)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    return require("gradio", "ui")


def format_stats(stats: RequestStats) -> str:
    g = stats.generation
    line = (
        f"first token {g.ttft_s * 1000:.0f} ms · {g.decode_tokens_per_s:.1f} tokens/s · "
        f"{g.prompt_tokens} prompt + {g.completion_tokens} generated tokens · "
        f"memory {stats.rss_bytes / 2**20:.0f} MiB (model {stats.model_bytes / 2**20:.0f} MiB)"
    )
    if g.speculative != "off":
        line += f" · {g.speculative} drafts accepted {g.accepted_tokens}/{g.drafted_tokens}"
    if stats.queue_wait_s >= 0.01:
        line += f" · waited {stats.queue_wait_s:.2f} s in the queue"
    if g.dropped_messages:
        line += f" · the {g.dropped_messages} oldest messages were left out to fit the context"
    if stats.finish_reason == "cancelled":
        line += " · stopped"
    elif stats.finish_reason == "length":
        line += " · stopped at the length limit"
    return line


def _live_stats(gen: Generation, first: float, now: float, pieces: int) -> str:
    # pieces ~ tokens while streaming; the exact counts come with the final line
    rate = (pieces - 1) / (now - first) if pieces > 1 and now > first else 0.0
    return f"streaming… first token {(first - gen.submitted_at) * 1000:.0f} ms · ~{rate:.1f} tokens/s"


def _history_messages(history: list[dict[str, Any]], budget: MediaBudget) -> list[Message]:
    """Gradio's chat history -> engine messages. A message's content is a string or a list of
    text and file items; an image file in the history (a picture the user sent earlier) is read
    back from gradio's cache, charged to `budget` like a new upload, so later turns still see it."""
    out = []
    for msg in history:
        if msg.get("role") not in ("user", "assistant"):
            continue
        content = msg.get("content")
        parts: list[Part] = []
        for item in content if isinstance(content, list) else [content]:
            if isinstance(item, str):
                parts.append(TextPart(_model_text(item) if msg["role"] == "user" else item))
            elif isinstance(item, dict) and item.get("text"):
                text = item["text"]
                parts.append(TextPart(_model_text(text) if msg["role"] == "user" else text))
            elif isinstance(item, dict) and _file_path(item) and msg["role"] == "user":
                parts.append(_history_image(_file_path(item), budget))
        parts = [p for p in parts if not isinstance(p, TextPart) or p.text]
        if parts:
            out.append(Message(msg["role"], tuple(parts)))
    return out


def _said(text: str, audio: bool, heard: list[str] | None, embedded: bool = False) -> str:
    """The user's message as the history shows it: with audio, first what the device heard
    (`heard` None while the worker is still listening; `embedded`: the LLM hears the audio itself,
    nothing is transcribed), then any typed text."""
    typed = text.strip() if audio else text
    if not audio:
        return typed
    spoken = " ".join(h.strip() for h in heard or [] if h.strip())
    head = AUDIO_ROWS if embedded else LISTENING if heard is None else (HEARD + spoken if spoken else HEARD_NOTHING)
    return f"{head}\n\n{typed}" if typed else head


def _model_text(shown: str) -> str:
    """A user message from the history -> the text the model reads: a turn that had audio keeps
    what was heard, as text (the audio itself is not sent again), then what was typed, as the
    engine joined them for that turn."""
    if not shown.startswith(("🎤 heard", LISTENING, AUDIO_ROWS)):
        return shown
    head, _, typed = shown.partition("\n\n")
    spoken = head[len(HEARD):] if head.startswith(HEARD) else ""
    return " ".join(t for t in (spoken.strip(), typed) if t)


def _file_path(item: dict[str, Any]) -> str | None:
    # {"path": ...} as the handler writes it, {"file": {"path": ...}} as gradio hands it back
    f = item.get("file") if isinstance(item.get("file"), dict) else item
    path = f.get("path")
    mime = f.get("mime_type") or ""
    return path if isinstance(path, str) and (not mime or mime.startswith("image/")) else None


def _history_image(path: str, budget: MediaBudget) -> ImagePart:
    budget.require("image")
    # The history comes from the browser: read only files gradio stored from an upload.
    if not is_uploaded(path):
        raise InputError("an image in the conversation is not one uploaded here; clear the conversation")
    try:
        data = Path(path).read_bytes()
    except OSError:
        raise InputError(
            "an image earlier in this conversation is no longer on the server (uploads are kept an hour); "
            "clear the conversation"
        ) from None
    return image_part(data, budget)


def _shown_image(image: str) -> str:
    """The uploaded image as a file in gradio's cache, for the chat history to show and keep."""
    if not image.startswith("data:"):
        return image
    from gradio.processing_utils import save_bytes_to_cache
    from gradio.utils import get_upload_folder

    return save_bytes_to_cache(decode_data_url(image, "image"), "image.png", get_upload_folder())


def _user_parts(text: str, image: str | None, audio: str | None, budget: MediaBudget) -> list[Part]:
    parts: list[Part] = []
    if image:
        budget.require("image")  # before reading the file: a text-only bundle never decodes it
        data = decode_data_url(image, "image") if image.startswith("data:") else _uploaded_bytes(image)
        parts.append(image_part(data, budget))
    if audio:
        budget.require("audio")
        parts.append(audio_part(_uploaded_bytes(audio), budget))
    if text.strip():
        parts.append(TextPart(text))
    if not parts:
        raise UserError("type a message (or add an image or audio) first")
    return parts


def _uploaded_bytes(path: str) -> bytes:
    # gradio hands over paths it took from the request: read only what it stored from an upload
    if not is_uploaded(path):
        raise InputError("a file in this request was not uploaded here; upload it again")
    return Path(path).read_bytes()


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _pass_uploads_through(image) -> None:
    """Hand our decoder the image as uploaded: gradio's own decoding answers a broken file with a
    stack of its internals, ours says what is wrong. (An instance override, not a subclass: gradio
    writes a .pyi stub next to the source of every Component subclass.)"""
    image.preprocess = lambda payload: None if payload is None else (payload.path or payload.url)


def _drawing(sketch: Any) -> str | None:
    """A picture drawn on the pad, flattened onto white and saved in gradio's cache (the history
    shows it like an upload); None when nothing is drawn."""
    if not isinstance(sketch, dict) or not any(
            layer is not None and np.asarray(layer)[..., -1].any() for layer in sketch.get("layers") or []):
        return None
    import io

    from gradio.processing_utils import save_bytes_to_cache
    from gradio.utils import get_upload_folder
    from PIL import Image

    rgba = np.asarray(sketch["composite"], dtype=np.uint8)
    alpha = rgba[..., 3:4].astype(np.float32) / 255
    flat = (rgba[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(flat).save(buf, format="PNG")
    return save_bytes_to_cache(buf.getvalue(), "drawing.png", get_upload_folder())


def build_ui(engine: Engine, retrieval: Any = None):
    """The chat page; with `retrieval` (runtime.retrieval.Retrieval) each text question is answered from its
    document index, in a conversation of its own, and the sources the reply used are shown under it."""
    gr = import_gradio()
    defaults = engine.defaults
    active: dict[str, Generation] = {}  # browser session -> its running turn, for the stop button
    lock = threading.Lock()

    base_choice = "base model"
    adapters = sorted(engine.pipeline.adapters)

    def respond(text, image, audio, history, system, temperature, top_p, max_tokens, seed, sketch=None,
                adapter=None, json_schema=None, request: gr.Request = None):
        history = list(history or [])
        key = request.session_hash or ""
        try:
            image = image or _drawing(sketch)  # an upload wins over a drawing
            budget = engine.media_budget()  # one per turn: the history's images count with the new ones
            past = _history_messages(history, budget)
            parts = _user_parts(text or "", image, audio, budget)
            messages = ([Message.text("system", system)] if system and system.strip() else [])
            messages += past + [Message("user", tuple(parts))]
            hits = None
            if retrieval is not None and (text or "").strip() and not image and not audio:
                grounded_system, hits = retrieval.ask(text.strip(), system.strip() if system else None)
                messages = [Message.text("system", grounded_system), Message("user", tuple(parts))]
            gen = engine.submit(ChatRequest(
                messages=tuple(messages),
                max_tokens=int(max_tokens),
                sampling=SamplingParams(temperature=float(temperature), top_p=float(top_p), seed=int(seed or 0)),
                trim_history=True,  # a long chat keeps going: the oldest turns make room
                adapter=None if adapter in (None, "", base_choice) else adapter,
                grammar=_grammar(engine, json_schema),
            ))
        except UserError as exc:
            # Shown, not added to the conversation: the inputs stay so the user can fix and resend.
            gr.Warning(str(exc))
            yield history, gr.skip(), gr.skip(), gr.skip(), f"⚠️ {exc}"
            return
        with lock:
            active[key] = gen
        # The image goes into the history as a file (shown, and sent again with later turns);
        # text as {"type": "text"} items, which gradio keeps verbatim (a bare string is dedented).
        # A turn with audio shows what the device heard, once the worker has it (with the first
        # piece, or at the end); that text, not the audio, is what later turns send again.
        shown: list[dict[str, Any]] = [{"path": _shown_image(image)}] if image else []
        user_at = len(history)

        def show_user(heard: list[str] | None) -> None:
            said = _said(text or "", bool(audio), heard, engine.pipeline.audio_embeds)
            history[user_at] = {"role": "user", "content": shown + ([_text(said)] if said.strip() else [])}

        history += [{"role": "user", "content": []}, {"role": "assistant", "content": [_text("")]}]
        show_user(None)
        yield history, "", None, None, "listening…" if audio else "waiting for the model…"
        reply, last, first, n = "", 0.0, 0.0, 0
        try:
            for piece in gen:
                reply, n, now = reply + piece, n + 1, time.perf_counter()
                if not first and audio:
                    show_user(gen.heard or None)
                first = first or now
                if now - last >= UPDATE_EVERY_S:
                    last = now
                    history[-1] = {"role": "assistant", "content": [_text(reply)]}
                    yield history, gr.skip(), gr.skip(), gr.skip(), _live_stats(gen, first, now, n)
        except UserError as exc:
            if audio and gen.heard:
                show_user(gen.heard or None)
            history[-1] = {"role": "assistant", "content": [_text(reply)]}
            yield history, gr.skip(), gr.skip(), gr.skip(), f"⚠️ {exc}"
            return
        finally:
            gen.cancel()  # no-op when finished; stops the model if gradio dropped this turn
            with lock:
                if active.get(key) is gen:
                    del active[key]
        if audio:
            show_user(gen.heard or None)  # a reply with no pieces: what was heard still shows
        history[-1] = {"role": "assistant", "content": [_text(reply)]}
        if hits is not None:
            from ..runtime.retrieval import sources_lines

            history[-1]["content"].append(_text("\n".join(sources_lines(reply, hits))))
        yield history, gr.skip(), gr.skip(), gr.skip(), format_stats(gen.stats)

    def stop(request: gr.Request) -> None:
        with lock:
            gen = active.get(request.session_hash or "")
        if gen is not None:
            gen.cancel()  # the running turn ends after its current token and shows what it had

    # The annotations are strings here (postponed evaluation) naming a local: give gradio the class.
    respond.__annotations__["request"] = stop.__annotations__["request"] = gr.Request

    takes = set(engine.pipeline.bundle.manifest.encoders)  # image, audio
    with gr.Blocks(title=f"vishwamai-edge · {engine.model_id}", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(f"### {engine.model_id}\nRuns on this machine; nothing leaves it.")
        with gr.Row():
            with gr.Column(scale=3):
                # no "share" button: it posts to Hugging Face
                chatbot = gr.Chatbot(elem_id="chat", label="Chat", height=460, latex_delimiters=[],
                                     buttons=["copy", "copy_all"])
                with gr.Row():
                    textbox = gr.Textbox(elem_id="prompt", show_label=False, placeholder="Ask something…",
                                         lines=1, max_lines=6, scale=5, autofocus=True)
                    send = gr.Button("Send", elem_id="send", variant="primary", scale=1, min_width=80)
                    stop_btn = gr.Button("Stop", elem_id="stop", variant="stop", scale=1, min_width=80)
                stats = gr.Markdown("", elem_id="stats")
            with gr.Column(scale=2):
                # only what the bundle takes (its manifest's encoders): a text-only bundle shows no upload
                image = gr.Image(label="Image (optional)", type="filepath", sources=["upload", "clipboard"],
                                 elem_id="image", height=180, visible="image" in takes)
                _pass_uploads_through(image)
                with gr.Accordion("…or draw one", open=False, visible="image" in takes):
                    sketch = gr.Sketchpad(elem_id="sketch", type="numpy", image_mode="RGBA", canvas_size=(224, 224),
                                          height=260, label="Drawing (sent when no image is uploaded)")
                audio = gr.Audio(label="Audio (optional)", type="filepath", sources=["upload", "microphone"],
                                 elem_id="audio", format=None,  # no conversion: our decoder checks it
                                 visible="audio" in takes)
                # LoRA adapters the bundle carries: switching one costs no reload
                adapter = gr.Dropdown([base_choice, *adapters], value=base_choice, label="adapter",
                                      elem_id="adapter", visible=bool(adapters), interactive=True)
                with gr.Accordion("Settings", open=False):
                    system = gr.Textbox(label="system prompt", value=defaults.system_prompt or "", lines=2)
                    temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                            label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top-p")
                    max_tokens = gr.Slider(1, max(16, engine.n_ctx // 2), step=1,
                                           value=min(defaults.max_tokens, engine.n_ctx // 2),
                                           label="max new tokens", elem_id="max-tokens")
                    seed = gr.Number(0, label="seed", precision=0)
                    json_schema = gr.Textbox(label="JSON schema: every reply valid under it (empty: free text)",
                                             lines=3, max_lines=12, elem_id="json-schema",
                                             placeholder='{"type": "object", "properties": {...}}')
                clear = gr.Button("Clear conversation")

        inputs = [textbox, image, audio, chatbot, system, temperature, top_p, max_tokens, seed, sketch, adapter,
                  json_schema]
        outputs = [chatbot, textbox, image, audio, stats]
        send.click(respond, inputs, outputs, api_name="chat")
        textbox.submit(respond, inputs, outputs, api_visibility="private")
        stop_btn.click(stop, None, None, queue=False, api_visibility="private")
        clear.click(lambda: ([], ""), None, [chatbot, stats], queue=False, api_visibility="private")

    # as many chats stream at once as the engine has slots; the engine's own queue holds the rest
    blocks.queue(default_concurrency_limit=engine.parallel, max_size=engine.max_queue)
    accept_uploads_only(blocks)
    return blocks


def _grammar(engine: Engine, text: str | None):
    """The settings' JSON schema as a grammar (None when the box is empty); a bad one is a UserError."""
    if not text or not text.strip():
        return None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"the JSON schema is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    return engine.compile_schema(schema, "JSON schema")


def _bytes(mb: float) -> int:
    if mb <= 0:
        raise UserError("the upload size limit must be positive")
    return int(mb * 1024 * 1024)


def body_limits(max_file_mb: float):
    """Byte limits for the page's requests. Gradio checks each uploaded file's size, not the
    request's: one upload request may carry up to two files of the limit (the page sends one
    per component) plus 1 MiB of form; any other request (a chat turn with its history) 20 MiB."""
    upload = 2 * _bytes(max_file_mb) + 2**20
    other = max(20 * 2**20, upload)
    return lambda path: upload if path.rstrip("/").endswith("/gradio_api/upload") else other


def theme():
    gr = import_gradio()
    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def launch_ui(engine: Engine, host: str = "127.0.0.1", port: int = 7860, max_file_mb: float = DEFAULT_MAX_FILE_MB,
              prevent_thread_lock: bool = False, quiet: bool = False, retrieval: Any = None):
    """Serve the page; with `prevent_thread_lock` return the running Blocks (call `.close()`)."""
    from starlette.middleware import Middleware

    from ..web.hosts import HostCheckMiddleware, allowed_hosts
    from ..web.limits import BodyLimitMiddleware

    blocks = build_ui(engine, retrieval)
    allowed = allowed_hosts(host)
    middleware = [Middleware(OfflineMiddleware), Middleware(BodyLimitMiddleware, limit_for=body_limits(max_file_mb))]
    if allowed is not None:
        middleware.append(Middleware(HostCheckMiddleware, allowed=allowed))
    blocks.launch(
        server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, pwa=False,
        mcp_server=False, enable_monitoring=False, show_error=True, quiet=quiet, theme=theme(),
        max_file_size=_bytes(max_file_mb), prevent_thread_lock=prevent_thread_lock, footer_links=["settings"],
        run_history=False, app_kwargs={"middleware": middleware},
    )
    return blocks


def mount_ui(app, engine: Engine, path: str = "/ui", max_file_mb: float = DEFAULT_MAX_FILE_MB, retrieval: Any = None):
    """The same page inside another FastAPI app (the API server, which checks the Host), on the same engine."""
    from starlette.middleware import Middleware

    from ..web.limits import BodyLimitMiddleware

    gr = import_gradio()
    blocks = build_ui(engine, retrieval)
    return gr.mount_gradio_app(app, blocks, path=path, max_file_size=_bytes(max_file_mb), ssr_mode=False,
                               pwa=False, mcp_server=False, enable_monitoring=False, theme=theme(),
                               footer_links=["settings"], run_history=False,
                               app_kwargs={"middleware": [Middleware(OfflineMiddleware), Middleware(
                                   BodyLimitMiddleware, limit_for=body_limits(max_file_mb))]})


def run_ui(bundle: Path, options: RuntimeOptions, host: str, port: int, max_queue: int, max_file_mb: float,
           docs: Path | str | None = None, top_k: int = 3) -> None:
    from ..web.listen import check_port_free, is_loopback

    _bytes(max_file_mb)  # a bad limit or a busy port fails before the model loads
    check_port_free(host, port)
    if not is_loopback(host):
        print(f"warning: serving the chat page on {host}: anyone who can reach this port can use the model",
              file=sys.stderr)
    engine = Engine.load(bundle, options, max_queue=max_queue)
    if engine.pipeline.speculative is not None and engine.pipeline.speculative.note:
        print(f"note: {engine.pipeline.speculative.note}", file=sys.stderr)
    retrieval = None
    try:
        if docs is not None:
            from ..runtime.retrieval import Retrieval

            retrieval = Retrieval.open(docs, engine.pipeline, top_k)
        launch_ui(engine, host, port, max_file_mb, retrieval=retrieval)
    finally:
        if retrieval is not None:
            retrieval.close()
        engine.close()
