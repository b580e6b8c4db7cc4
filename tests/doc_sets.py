"""A generated document set for the retrieval tests: 60 maintenance notes about 60 invented machines, each with
one fact the questions ask about, in .txt, .md, .html and .pdf; every note shares its wording with the others
(the same parts, the same verbs), so only the machine's name and the fact tell them apart."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

SYLLABLES = ["bran", "tel", "mor", "vik", "sal", "dun", "quor", "pell", "zan", "hob", "lir", "gast", "tov", "mek",
             "rud", "fen", "cal", "wyn", "dorr", "ix"]
PARTS = ["coolant filter", "drive belt", "spindle bearing", "hydraulic seal", "air intake screen", "chain guide"]
KINDS = ["press", "lathe", "mill", "pump", "loom", "kiln"]


@dataclass(frozen=True)
class Note:
    name: str  # file name
    machine: str
    part: str
    hours: int
    question: str


def notes(n: int = 60, seed: int = 0) -> list[Note]:
    rng = random.Random(seed)
    names: set[str] = set()
    out = []
    while len(out) < n:
        machine = (rng.choice(SYLLABLES) + rng.choice(SYLLABLES)).capitalize() + " " + rng.choice(KINDS)
        if machine.split()[0] in names:
            continue
        names.add(machine.split()[0])
        part, hours = rng.choice(PARTS), rng.randrange(50, 5000, 50)
        ext = [".txt", ".md", ".html", ".pdf"][len(out) % 4]
        out.append(Note(f"note-{len(out):02d}{ext}", machine, part, hours,
                        f"How often must the {part} of the {machine} be replaced?"))
    return out


def body(note: Note) -> str:
    return (f"Maintenance note for the {note.machine}. Replace the {note.part} of the {note.machine} every "
            f"{note.hours} operating hours. Check the oil level weekly and keep the guards closed while it runs. "
            f"Log every replacement in the workshop book.")


def write_set(folder: Path, n: int = 60, seed: int = 0) -> list[Note]:
    folder.mkdir(parents=True, exist_ok=True)
    out = notes(n, seed)
    for note in out:
        text = body(note)
        path = folder / note.name
        if path.suffix == ".md":
            path.write_text(f"# {note.machine}\n\nIntroduction: a machine of the workshop.\n\n## Service\n\n{text}\n")
        elif path.suffix == ".html":
            path.write_text(f"<html><head><title>x</title><script>var secret = 1;</script></head><body>"
                            f"<h1>{note.machine}</h1><p>{text}</p></body></html>")
        elif path.suffix == ".pdf":
            write_pdf(path, ["Workshop manual, cover page.", text])
        else:
            path.write_text(text + "\n")
    return out


def write_pdf(path: Path, pages: list[str]) -> None:
    """A minimal PDF (one Helvetica text line per page), written by hand so that no PDF writer is needed."""
    objects: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]
    kids = []
    for text in pages:
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 9 Tf 20 700 Td ({escaped}) Tj ET".encode("latin-1")
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        content = len(objects)
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content} 0 R "
                       f"/Resources << /Font << /F1 << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >> >> >>"
                       .encode())
        kids.append(len(objects))
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>".encode()
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + obj + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(bytes(out))
