"""Fine-tuning data: JSONL chat sets and raw text, tokenized with the model's own chat template.

Accepted lines (one JSON object each; other keys are ignored):

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"instruction": "...", "input": "...", "output": "..."}        (input and system optional)
    {"text": "..."}                                                   (continued pre-training)

Chat examples are rendered with the tokenizer's chat template, exactly as the runtime
renders a conversation, and only the assistant turns (with their end-of-turn token)
carry a loss. Raw text is concatenated and cut into blocks, every token trained.
Message content may also be a list of parts, `{"type": "text", "text": ...}` and
`{"type": "image", "image": "relative/path.png"}`, for vision-language models, or
`{"type": "audio", "audio": "relative/path.wav"}`, for an LLM with an audio encoder (align).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ..errors import UserError
from ..fsutil import jsonl_objects

IGNORE = -100  # label of a token without loss (torch's cross_entropy ignore_index)
ROLES = ("system", "user", "assistant")
TEXT_SUFFIXES = (".txt", ".md", ".text")
Format = Literal["auto", "messages", "instruction", "text"]


class DatasetError(UserError):
    """A fine-tuning dataset is missing, empty or has a malformed line."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None  # set by packing: restarts at 0 for each packed example
    extra: dict[str, Any] = field(default_factory=dict)  # model inputs such as pixel_values

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class Record:
    """One line of a dataset, converted to chat messages (or raw text), with where it came from."""

    where: str  # "file:line", for error messages
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    base_dir: Path = Path(".")  # image paths are relative to the data file


def shipped_dataset(name: str) -> Path:
    """A dataset shipped inside the package (vishwamai_edge/data/<name>)."""
    path = Path(str(resources.files("vishwamai_edge") / "data" / name))
    if not path.is_file():
        raise DatasetError(f"the package has no shipped dataset {name!r}")
    return path


# -- reading -------------------------------------------------------------------------------
def read_dataset(path: Path, fmt: Format = "auto") -> list[Record]:
    """All records of a JSONL file, a text file, or a folder of them; errors name the file and line."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", *TEXT_SUFFIXES))
        if not files:
            raise DatasetError(f"dataset folder {path} has no .jsonl or .txt files")
        records = [r for f in files for r in read_dataset(f, fmt)]
    elif not path.is_file():
        raise DatasetError(f"dataset {path} does not exist")
    elif path.suffix in TEXT_SUFFIXES:
        if fmt not in ("auto", "text"):
            raise DatasetError(f"{path}: a plain text file is raw text; set finetune.dataset.format to text")
        text = _read_text(path)
        records = [Record(f"{path}", text=text)] if text.strip() else []
    else:
        records = [_record(obj, path, n, fmt) for n, obj in jsonl_objects(_read_text(path), path, DatasetError)]
    if not records:
        raise DatasetError(f"dataset {path} has no examples (the file is empty)")
    return records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start})") from None




def _record(obj: dict[str, Any], path: Path, n: int, fmt: Format) -> Record:
    where = f"{path}:{n}"
    if fmt == "auto":
        fmt = "messages" if "messages" in obj else "instruction" if "instruction" in obj else (
            "text" if "text" in obj else "auto")
        if fmt == "auto":
            raise DatasetError(
                f"{where}: no 'messages' field (nor 'instruction'/'output', nor 'text'); "
                'expected {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}'
            )
    if fmt == "messages":
        if "messages" not in obj:
            raise DatasetError(f"{where}: no 'messages' field")
        return Record(where, messages=_check_messages(obj["messages"], where), base_dir=path.parent)
    if fmt == "instruction":
        for key in ("instruction", "output"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise DatasetError(f"{where}: '{key}' must be a non-empty string")
        user = obj["instruction"] + (f"\n\n{obj['input']}" if str(obj.get("input") or "").strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
        if str(obj.get("system") or "").strip():
            messages.insert(0, {"role": "system", "content": obj["system"]})
        return Record(where, messages=messages, base_dir=path.parent)
    if "text" not in obj:
        raise DatasetError(f"{where}: no 'text' field; --method cpt reads 'text' lines or .txt files")
    if not isinstance(obj["text"], str):
        raise DatasetError(f"{where}: 'text' must be a string")
    return Record(where, text=obj["text"])


def _check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DatasetError(f"{where}: messages.{i}: must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise DatasetError(f"{where}: messages.{i}.role: must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") in ("text", "image", "audio")):
                    raise DatasetError(f"{where}: messages.{i}.content.{j}: a part is "
                                       "{'type': 'text'|'image'|'audio', ...}")
        elif not isinstance(content, str):
            raise DatasetError(f"{where}: messages.{i}.content: must be a string or a list of parts")
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: 'messages' has no assistant turn, so nothing would be trained")
    return messages


def split_eval(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out a seeded random `fraction` of the records (at least one) for the eval loss."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    k = max(1, round(len(records) * fraction))
    held = set(order[:k])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


# -- tokenizing ----------------------------------------------------------------------------
@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # truncation left no assistant token
    tokens: int = 0
    trained_tokens: int = 0


def encode_chats(records: list[Record], tokenizer, max_seq_len: int, processor=None) -> tuple[list[Example], EncodeStats]:
    """Render each conversation with the chat template; loss on assistant tokens only."""
    if not getattr(tokenizer, "chat_template", None) and not getattr(processor, "chat_template", None):
        raise DatasetError("the model's tokenizer has no chat template; train raw text with --method cpt instead")
    stats = EncodeStats()
    out = []
    for rec in records:
        if rec.messages is None:
            raise DatasetError(f"{rec.where}: raw text in a chat dataset; use --method cpt for raw text")
        ex = encode_chat(rec, tokenizer, processor)
        if len(ex.input_ids) > max_seq_len:
            stats.truncated += 1
            ex.input_ids, ex.labels = ex.input_ids[:max_seq_len], ex.labels[:max_seq_len]
            if ex.extra:  # cutting image tokens would orphan pixel values
                raise DatasetError(f"{rec.where}: {len(ex.labels)}+ tokens with images exceed finetune.max_seq_len")
        if ex.trained_tokens == 0:
            stats.dropped += 1
            continue
        stats.examples += 1
        stats.tokens += len(ex.input_ids)
        stats.trained_tokens += ex.trained_tokens
        out.append(ex)
    return out, stats


def encode_chat(rec: Record, tokenizer, processor=None) -> Example:
    messages = rec.messages or []
    render = processor if processor is not None else tokenizer
    images = [_media_path(p, rec, "image") for m in messages if isinstance(m["content"], list)
              for p in m["content"] if p.get("type") == "image"]
    audio = [_media_path(p, rec, "audio") for m in messages if isinstance(m["content"], list)
             for p in m["content"] if p.get("type") == "audio"]
    hears = getattr(processor, "modality", "image") == "audio"
    if images and (processor is None or hears):
        raise DatasetError(f"{rec.where}: has images, but the model is not a vision-language model")
    if audio and not hears:
        raise DatasetError(f"{rec.where}: has audio, but the model has no audio encoder (align with encoder "
                           "kind whisper)")

    def text(msgs: list[dict[str, Any]], gen: bool = False) -> str:
        try:
            return render.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as exc:  # noqa: BLE001 (Jinja raises many kinds; templates raise_exception on bad turns)
            raise DatasetError(f"{rec.where}: the chat template refused this conversation: {exc}") from None

    full = text(messages)
    spans = []  # character spans of the assistant turns in `full`
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = text(messages[:i], gen=True), text(messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DatasetError(
                f"{rec.where}: the chat template renders earlier turns differently once later turns follow, "
                "so assistant tokens cannot be located"
            )
        spans.append((len(before), len(upto)))
    ids, labels = _tokenize_with_spans(tokenizer if processor is None else processor.tokenizer, full, spans)
    extra: dict[str, Any] = {}
    if processor is not None and images:
        ids, labels, extra = _expand_media(processor, full, {"images": _read_images(images, rec.where)},
                                           processor.image_token, ids, labels, rec.where)
    elif audio:
        ids, labels, extra = _expand_media(processor, full, {"audio": _read_audio(audio, rec.where)},
                                           processor.audio_token, ids, labels, rec.where)
    return Example(ids, labels, extra=extra)


def _tokenize_with_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of `text` (the template wrote any BOS itself) and labels inside `spans`."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError):
        offsets = None  # slow tokenizers have no offsets: count tokens of each prefix instead
    if offsets is not None:
        ids = list(enc["input_ids"])
        labels = [t if any(a <= s < b for a, b in spans) else IGNORE for t, (s, _e) in zip(ids, offsets)]
        return ids, labels
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    labels = [IGNORE] * len(ids)
    for a, b in spans:
        lo = len(tokenizer(text[:a], add_special_tokens=False)["input_ids"])
        hi = len(tokenizer(text[:b], add_special_tokens=False)["input_ids"])
        labels[lo:hi] = ids[lo:hi]
    return ids, labels


def _media_path(part: dict[str, Any], rec: Record, kind: str) -> Path:
    ref = part.get(kind) or part.get("path")
    if not isinstance(ref, str):
        an = "an" if kind[0] in "aeiou" else "a"
        raise DatasetError(f"{rec.where}: {an} {kind} part needs '{kind}': a file path")
    path = Path(ref) if Path(ref).is_absolute() else rec.base_dir / ref
    if not path.is_file():
        raise DatasetError(f"{rec.where}: {kind} {path} does not exist")
    return path


def _read_images(paths: list[Path], where: str) -> list[Any]:
    from PIL import Image

    pil = []
    for p in paths:
        try:
            with Image.open(p) as im:
                pil.append(im.convert("RGB"))  # decodes the whole file: a truncated one fails here
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"{where}: image {p} is not a readable image ({str(exc).splitlines()[0]})") from None
    return pil


def _read_audio(paths: list[Path], where: str) -> list[tuple[Any, int]]:
    """(mono float32 samples, rate) per file, decoded as the device decodes an upload."""
    from ..runtime.media import audio_part

    out = []
    for p in paths:
        try:
            part = audio_part(p.read_bytes())
        except UserError as exc:
            raise DatasetError(f"{where}: audio {p} is not readable audio ({exc})") from None
        out.append((part.samples, part.sample_rate))
    return out


def _expand_media(processor, text, media, placeholder, ids, labels, where):
    """The processor's input ids (each image or audio placeholder expanded to its rows) and its inputs
    (`media`: images= or audio=).

    Labels are expanded alongside: placeholder tokens never carry a loss.
    """
    try:
        enc = processor(text=[text], **media, return_tensors="pt", add_special_tokens=False)
    except UserError as exc:  # e.g. audio longer than the encoder's window
        raise DatasetError(f"{where}: {exc}") from None
    full = enc["input_ids"][0].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids(placeholder)
    n_placeholders = ids.count(image_id)
    per_image = (len(full) - (len(ids) - n_placeholders)) // max(n_placeholders, 1)
    new_ids, new_labels = [], []
    for t, lab in zip(ids, labels):
        reps = per_image if t == image_id else 1
        new_ids += [t] * reps
        new_labels += [IGNORE if t == image_id else lab] * reps
    if new_ids != full:
        raise DatasetError(f"{where}: cannot align the processor's placeholder tokens with the chat template's")
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
    return new_ids, new_labels, extra


def encode_text(records: list[Record], tokenizer, max_seq_len: int) -> tuple[list[Example], EncodeStats]:
    """Continued pre-training: documents joined by EOS, cut into blocks of `max_seq_len`, all trained."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for rec in records:
        if rec.text is None:
            raise DatasetError(f"{rec.where}: a chat example in a raw-text dataset; --method cpt reads 'text' lines or .txt files")
        stream += list(tokenizer(rec.text, add_special_tokens=True)["input_ids"])
        if eos is not None:
            stream.append(eos)
    blocks = [stream[i : i + max_seq_len] for i in range(0, len(stream), max_seq_len)]
    blocks = [b for b in blocks if len(b) > 1]
    stats = EncodeStats(examples=len(blocks), tokens=sum(map(len, blocks)))
    stats.trained_tokens = stats.tokens
    return [Example(b, list(b)) for b in blocks], stats


# -- batching ------------------------------------------------------------------------------
def pack(examples: list[Example], max_seq_len: int) -> list[Example]:
    """Greedy packing, in order: several short examples share one row of up to `max_seq_len`.

    Position ids restart at 0 for every example; transformers reads that as separate
    sequences and masks attention between them, so packing changes speed, not maths.
    """
    rows: list[Example] = []
    cur = Example([], [], [])
    for ex in examples:
        if ex.extra:
            raise DatasetError("packing is not supported for examples with images; set finetune.packing: false")
        if cur.input_ids and len(cur.input_ids) + len(ex.input_ids) > max_seq_len:
            rows.append(cur)
            cur = Example([], [], [])
        cur.input_ids += ex.input_ids
        cur.labels += ex.labels
        cur.position_ids += list(range(len(ex.input_ids)))
    if cur.input_ids:
        rows.append(cur)
    return rows


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors. Packed rows go without an attention mask (their position ids say it)."""
    import torch

    n = max(len(e.input_ids) for e in examples)
    pad = [n - len(e.input_ids) for e in examples]
    batch: dict[str, Any] = {
        "input_ids": torch.tensor([e.input_ids + [pad_id] * p for e, p in zip(examples, pad)]),
        "labels": torch.tensor([e.labels + [IGNORE] * p for e, p in zip(examples, pad)]),
    }
    if examples[0].position_ids is not None:
        batch["position_ids"] = torch.tensor(
            [e.position_ids + list(range(p)) for e, p in zip(examples, pad)]  # padding: its own sequence
        )
    else:
        batch["attention_mask"] = torch.tensor([[1] * len(e.input_ids) + [0] * p for e, p in zip(examples, pad)])
    keys = {k for e in examples for k in e.extra}
    for k in keys:
        batch[k] = torch.cat([e.extra[k] for e in examples if k in e.extra])
    batch["n_tokens"] = sum(len(e.input_ids) for e in examples)
    return batch
