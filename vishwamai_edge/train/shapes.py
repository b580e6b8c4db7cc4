"""A picture set drawn on the fly: one coloured shape per image, with questions about it.

Made for `align`: it shows, on a machine with no vision-language weights, that an image
really reaches the LLM. Each image is one of six colours x three kinds of shape, drawn at a
random size, position and tilt over a random background (a grey or a muted tint, flat, a
gradient or noisy). The split is by combination: six (colour, kind) pairs never appear in
training, and the eval set holds only those, so answering them needs colour and kind
understood apart, not the pair remembered. Every colour and every kind still appears in
training (each colour with two of the three main kinds, each main kind with four colours), and
three more kinds (star, hexagon, cross) appear in training only, in every colour.

Files are a pure function of the spec (seed included): the same spec gives the same bytes.

    <out>/train.jsonl, <out>/eval.jsonl   chat lines with an image part, plus "colour" and "shape"
    <out>/images/train-00000.png ...
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..fsutil import atomic_dir

# hue (0-1), as the names are used in English; saturation and value are drawn per image
COLOURS: dict[str, float] = {
    "red": 0.0, "orange": 0.075, "yellow": 0.155, "green": 0.33, "blue": 0.62, "purple": 0.78,
}
SHAPES = ("circle", "square", "triangle")  # the kinds the held-out questions are about
# Kinds that appear in training only, in every colour: they keep colour from being learnt as a
# property of the three main kinds (without them colour reads only 65% right on held-out pairs,
# as each colour is seen with just two of the three main kinds).
EXTRA_SHAPES = ("star", "hexagon", "cross")
KINDS = SHAPES + EXTRA_SHAPES
# each colour held out once, each kind twice: a Latin-square-like pattern
HELD_OUT = frozenset({
    ("red", "circle"), ("yellow", "circle"), ("green", "square"),
    ("purple", "square"), ("blue", "triangle"), ("orange", "triangle"),
})
COLOUR_QUESTIONS = ("What colour is the shape?", "What color is the shape in the picture?",
                    "Which colour is it?")
SHAPE_QUESTIONS = ("What shape is this?", "What kind of shape is in the picture?", "Which shape do you see?")
DESCRIBE_QUESTIONS = ("Describe the picture.", "What is in the image?")
# the two questions the evaluation asks of every held-out image
ASK_COLOUR, ASK_SHAPE = COLOUR_QUESTIONS[0], SHAPE_QUESTIONS[0]


def colour_answer(colour: str) -> str:
    return f"It is {colour}."


def shape_answer(shape: str) -> str:
    return f"It is a {shape}."


def describe_answer(colour: str, shape: str) -> str:
    return f"A {colour} {shape}."


@dataclass(frozen=True)
class ShapesFiles:
    root: Path
    train: Path
    eval: Path


def combinations(held_out: bool) -> list[tuple[str, str]]:
    kinds = SHAPES if held_out else KINDS
    return [(c, s) for c in COLOURS for s in kinds if ((c, s) in HELD_OUT) == held_out]


def draw(colour: str, shape: str, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """One (size, size, 3) uint8 picture of a `colour` `shape`."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(_background(rng, size))
    hue = (COLOURS[colour] + rng.uniform(-0.02, 0.02)) % 1.0
    sat, val = rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0)
    if colour == "purple":
        val = rng.uniform(0.55, 0.85)  # a bright purple reads as pink
    fill = tuple(int(round(255 * v)) for v in colorsys.hsv_to_rgb(hue, sat, val))
    radius = rng.uniform(0.16, 0.32) * size
    cx, cy = (rng.uniform(radius + 2, size - radius - 2) for _ in range(2))
    tilt = rng.uniform(-0.35, 0.35)  # radians; a square never turns into a diamond
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape in ("star", "hexagon", "cross"):
        if shape == "star":  # five points, inner radius 0.45
            radii, angles = [radius * (1.0 if k % 2 == 0 else 0.45) for k in range(10)], 10
        elif shape == "hexagon":
            radii, angles = [radius] * 6, 6
        else:  # a plus sign: 12 corners, arms a third of the width
            radii, angles = None, 12
        if radii is not None:
            points = [(cx + r * math.cos(tilt - math.pi / 2 + 2 * math.pi * k / angles),
                       cy + r * math.sin(tilt - math.pi / 2 + 2 * math.pi * k / angles)) for k, r in enumerate(radii)]
        else:
            a, b = radius, radius / 3
            corners = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
                       (-a, -b), (-b, -b)]
            c, s_ = math.cos(tilt), math.sin(tilt)
            points = [(cx + x * c - y * s_, cy + x * s_ + y * c) for x, y in corners]
        pen.polygon(points, fill=fill)
    else:
        corners = 4 if shape == "square" else 3
        start = tilt + (math.pi / 4 if corners == 4 else -math.pi / 2)
        r = radius * (1.0 if corners == 4 else 1.1)
        pen.polygon([(cx + r * math.cos(start + 2 * math.pi * k / corners),
                      cy + r * math.sin(start + 2 * math.pi * k / corners)) for k in range(corners)], fill=fill)
    return np.asarray(image)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey or a muted tint (saturation <= 0.25, so never mistaken for a shape's colour):
    flat, a linear gradient, or with pixel noise."""
    def muted() -> np.ndarray:
        rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.25), rng.uniform(0.15, 0.95))
        return 255 * np.array(rgb)

    style = rng.integers(0, 3)
    base = np.broadcast_to(muted(), (size, size, 3)).astype(np.float64)
    if style == 1:
        t = np.linspace(0, 1, size)
        ramp = t[None, :, None] if rng.integers(0, 2) else t[:, None, None]
        base = base * (1 - ramp) + muted() * ramp
    elif style == 2:
        base = base + rng.normal(0, 12, (size, size, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def _lines(split: str, count: int, rng: np.random.Generator, size: int, images: Path) -> list[dict[str, Any]]:
    from PIL import Image

    combos = combinations(held_out=split == "eval")
    out = []
    for i in range(count):
        colour, shape = combos[i % len(combos)]  # balanced over the split's combinations
        name = f"{split}-{i:05d}.png"
        Image.fromarray(draw(colour, shape, rng, size)).save(images / name, optimize=False)
        rel = f"images/{name}"
        if split == "eval":  # the two questions the evaluation asks
            asks = [(ASK_COLOUR, colour_answer(colour)), (ASK_SHAPE, shape_answer(shape))]
        else:
            asks = [(COLOUR_QUESTIONS[rng.integers(0, 3)], colour_answer(colour)),
                    (SHAPE_QUESTIONS[rng.integers(0, 3)], shape_answer(shape))]
            if rng.random() < 0.5:
                asks.append((DESCRIBE_QUESTIONS[rng.integers(0, 2)], describe_answer(colour, shape)))
        for question, answer in asks:
            out.append({
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": rel}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": answer},
                ],
                "colour": colour, "shape": shape,
            })
    return out


def write_shapes(out: Path, train: int, eval: int, seed: int = 0, size: int = 224) -> ShapesFiles:
    """Draw the set into `out` (atomically; an existing complete set of the same spec is kept)."""
    out = Path(out)
    spec = {"train": train, "eval": eval, "seed": seed, "size": size}
    files = ShapesFiles(out, out / "train.jsonl", out / "eval.jsonl")
    stamp = out / "shapes.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec and files.train.is_file() and files.eval.is_file():
        return files
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        for split, count, offset in (("train", train, 0), ("eval", eval, 1)):
            rng = np.random.default_rng([seed, offset])
            lines = _lines(split, count, rng, size, tmp / "images")
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
        (tmp / "shapes.json").write_text(json.dumps(spec))
    return files


def held_out_questions(eval_jsonl: Path) -> list[dict[str, Any]]:
    """The eval set as (image path, question, what the answer must name, which attribute) items."""
    items = []
    for line in Path(eval_jsonl).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        user = row["messages"][0]["content"]
        question = next(p["text"] for p in user if p["type"] == "text")
        image = Path(eval_jsonl).parent / next(p["image"] for p in user if p["type"] == "image")
        attribute = "colour" if question == ASK_COLOUR else "shape"
        items.append({"image": image, "question": question, "attribute": attribute, "truth": row[attribute]})
    return items


def named(answer: str, attribute: str) -> str | None:
    """The one colour (or kind) an answer names; None when it names none or several."""
    words = set(answer.lower().replace(".", " ").replace(",", " ").split())
    options = COLOURS if attribute == "colour" else KINDS
    hits = [o for o in options if o in words]
    return hits[0] if len(hits) == 1 else None
