"""Local documents as text with positions: .txt, .md, .html and .pdf, each cut into sections that carry where
they came from (a PDF's page, a Markdown or HTML heading), then into overlapping chunks of the embedding
tokenizer's tokens. Torch-free: pypdf for PDFs (pure Python, maintained), the standard library's HTML parser."""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from ..errors import InputError, require

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


class UnreadableDocument(InputError):
    """A file that cannot be read as a document: skipped with a warning naming it, never half-indexed."""


@dataclass(frozen=True)
class Section:
    text: str
    page: int | None = None  # 1-based, PDFs
    heading: str | None = None  # the last heading above the text (Markdown, HTML)


@dataclass(frozen=True)
class Chunk:
    text: str
    page: int | None
    heading: str | None
    start: int  # character offsets in the section's text
    end: int


def read_document(path: Path) -> list[Section]:
    """The sections of one file; UnreadableDocument (one line, naming it) for a binary, encrypted or broken one."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UnreadableDocument(f"{path}: not a document this index reads ({', '.join(SUFFIXES)})")
    if suffix == ".pdf":
        return _pdf(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UnreadableDocument(f"{path}: cannot be read ({exc.strerror})") from None
    if b"\x00" in raw[:8192]:
        raise UnreadableDocument(f"{path}: a binary file, not text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableDocument(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if suffix in (".html", ".htm"):
        return _html(text)
    if suffix in (".md", ".markdown"):
        return _markdown(text)
    return [Section(text)] if text.strip() else []


def _markdown(text: str) -> list[Section]:
    out: list[Section] = []
    heading: str | None = None
    lines: list[str] = []

    def flush() -> None:
        body = "\n".join(lines).strip()
        if body:
            out.append(Section(body, heading=heading))
        lines.clear()

    for line in text.splitlines():
        m = _HEADING.match(line)
        if m:
            flush()
            heading = m.group(2)
        lines.append(line)
    flush()
    return out


class _Html(HTMLParser):
    SKIP = {"script", "style", "noscript", "template", "head"}
    BLOCK = {"p", "div", "li", "tr", "br", "section", "article", "pre", "table", "ul", "ol", "blockquote"}
    HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[Section] = []
        self.heading: str | None = None
        self.parts: list[str] = []
        self.title: list[str] | None = None
        self.skipping = 0

    def flush(self) -> None:
        body = re.sub(r"[ \t]+", " ", "".join(self.parts))
        body = re.sub(r"\n\s*\n+", "\n\n", body).strip()
        if body:
            self.sections.append(Section(body, heading=self.heading))
        self.parts = []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.HEADINGS:
            self.flush()
            self.title = []
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.HEADINGS and self.title is not None:
            self.heading = " ".join("".join(self.title).split()) or self.heading
            self.parts.append(self.heading or "")
            self.parts.append("\n")
            self.title = None
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skipping:
            return
        if self.title is not None:
            self.title.append(data)
        else:
            self.parts.append(data)


def _html(text: str) -> list[Section]:
    parser = _Html()
    parser.feed(text)
    parser.close()
    parser.flush()
    return parser.sections


def _pdf(path: Path) -> list[Section]:
    pypdf = require("pypdf", "runtime")
    try:
        reader = pypdf.PdfReader(str(path))
        if reader.is_encrypted:
            raise UnreadableDocument(f"{path}: an encrypted PDF (decrypt it first)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except UnreadableDocument:
        raise
    except Exception as exc:  # noqa: BLE001  pypdf raises many types for a broken file
        raise UnreadableDocument(f"{path}: not a readable PDF ({type(exc).__name__}: {str(exc)[:80]})") from None
    return [Section(t, page=i + 1) for i, t in enumerate(pages) if t.strip()]


def chunk_sections(sections: list[Section], tokenizer, max_tokens: int, overlap: int) -> list[Chunk]:
    """Each section cut into windows of at most `max_tokens` tokens of the embedding tokenizer (its special
    tokens excluded, so a chunk plus them fits the model), consecutive windows sharing `overlap` tokens; a chunk's
    text is the section's characters its tokens cover."""
    if not 0 <= overlap < max_tokens:
        raise InputError(f"the chunk overlap ({overlap}) must be below the chunk size ({max_tokens} tokens)")
    out: list[Chunk] = []
    step = max_tokens - overlap
    for sec in sections:
        enc = tokenizer.encode(sec.text, add_special_tokens=False)
        offsets = [o for o in enc.offsets]
        if not offsets:
            continue
        for begin in range(0, len(offsets), step):
            window = offsets[begin:begin + max_tokens]
            start, end = window[0][0], window[-1][1]
            text = sec.text[start:end].strip()
            if text:
                out.append(Chunk(text, sec.page, sec.heading, start, end))
            if begin + max_tokens >= len(offsets):
                break
    return out
