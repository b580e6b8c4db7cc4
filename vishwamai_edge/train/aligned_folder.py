"""The aligned vision-language model folder that `align` writes and the build reads.

    <folder>/vlm.json                format, encoder, projector, image token (below)
    <folder>/encoder/                the frozen encoder: model.safetensors (+ config.json for HF towers)
    <folder>/projector.safetensors   the trained projector: layers.<i>.weight / layers.<i>.bias
    <folder>/llm/                    a plain HF causal-LM folder (LoRA of stage 2 merged), its tokenizer
                                     holding the image token and the image chat template

vlm.json:
    {"format": "vishwamai-vlm", "version": 1,
     "encoder": {"family": "efficientnet-lite0", "grid": [7, 7], "dim": 1280, "image_size": [224, 224],
                 "preprocess": {...ImageProcessorSpec...}},
     "projector": {"depth": 2, "tokens": 16, "grid": [7, 7], "in_dim": 1280, "hidden": 576, "out_dim": 576,
                   "activation": "gelu"},
     "image_token": {"text": "<image>", "id": 49152},
     "training": {...}}

An audio encoder (family whisper) writes `"modality": "audio"` and n_mels / n_frames in `encoder`,
`"stack"` in `projector`, and `audio_token` ({"text": "<audio>", "id": ...}) instead of `image_token`.

An image is one placeholder token in the rendered chat; its `tokens` projector rows take
that token's place, in training (the placeholder repeated, rows scattered in) as on the
device (`runtime.prompts.Prompt`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError, require
from ..runtime.preprocess import ImageProcessorSpec
from . import encoders as E
from .projector import make_projector

FORMAT = "vishwamai-vlm"
VERSION = 1
INFO = "vlm.json"


def is_aligned(folder: Path) -> bool:
    return (Path(folder) / INFO).is_file()


def image_chat_template(template: str, image_text: str, kind: str = "image") -> str:
    """The LLM's own chat template behind a preamble that turns part lists into strings, each part of
    `kind` (image, audio) becoming `image_text`: training and the runtime (which passes parts) render
    the same text."""
    marker = json.dumps(image_text)
    preamble = (
        "{%- set flat = namespace(messages=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if m['content'] is string -%}{%- set text = m['content'] -%}"
        "{%- else -%}{%- set acc = namespace(text='') -%}"
        "{%- for p in m['content'] -%}"
        "{%- if p['type'] == " + json.dumps(kind) + " -%}{%- set acc.text = acc.text ~ " + marker + " -%}"
        "{%- else -%}{%- set acc.text = acc.text ~ p['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- set text = acc.text -%}{%- endif -%}"
        "{%- set flat.messages = flat.messages + [{'role': m['role'], 'content': text}] -%}"
        "{%- endfor -%}"
        "{%- set messages = flat.messages -%}"
    )
    return preamble + template


def splice(embeds: Any, input_ids: Any, rows: Any, image_id: int) -> Any:
    """Each placeholder position (image or audio) of `input_ids` takes the next projector row, in order."""
    mask = (input_ids == image_id).unsqueeze(-1)
    rows = rows.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
    if int(mask.sum()) != rows.shape[0]:
        raise ExportError(f"{int(mask.sum())} image-token positions for {rows.shape[0]} projector rows")
    return embeds.masked_scatter(mask, rows)


@dataclass
class Aligned:
    folder: Path
    info: dict[str, Any]
    encoder: Any  # train.encoders.EncoderFamily
    projector: Any

    @property
    def llm_dir(self) -> Path:
        return self.folder / "llm"

    @property
    def modality(self) -> str:
        return str(self.info["encoder"].get("modality", "image"))

    @property
    def image_token(self) -> dict[str, Any]:
        """The placeholder (image or audio) whose positions take the projector's rows."""
        return dict(self.info[f"{self.modality}_token"])

    @property
    def spec(self) -> ImageProcessorSpec:
        return self.encoder.spec

    def vision_graph(self) -> Any:
        """encoder -> projector as one torch module (pixels, or log-mel for audio, in): what the ONNX
        export traces and checks."""
        torch = require("torch", "train")
        encoder, projector = self.encoder.module, self.projector

        class EncoderAndProjector(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.encoder, self.projector = encoder, projector

            def forward(self, inputs):
                return self.projector(self.encoder(inputs))

        return EncoderAndProjector().eval()


def write_aligned(out: Path, encoder: Any, projector: Any, llm: Any, tokenizer: Any, image_token: dict[str, Any],
                  training: dict[str, Any]) -> None:
    """Write the folder into `out` (the caller makes it atomic)."""
    from safetensors.torch import save_file

    out = Path(out)
    encoder.save(out / "encoder")
    state = {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
    save_file(state, str(out / "projector.safetensors"), metadata={"format": "pt"})
    llm.save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")
    described = encoder.describe()
    if encoder.modality == "image":
        described["preprocess"] = encoder.spec.to_dict()
    else:
        described["modality"] = encoder.modality
    info = {"format": FORMAT, "version": VERSION, "encoder": described, "projector": projector.describe(),
            f"{encoder.modality}_token": image_token, "training": training}
    (out / INFO).write_text(json.dumps(info, indent=2))


def read_info(folder: Path) -> dict[str, Any]:
    path = Path(folder) / INFO
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} cannot be read ({exc})") from None
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise ExportError(f"{path} is not a {FORMAT} v{VERSION} description")
    modality = info.get("encoder", {}).get("modality", "image") if isinstance(info.get("encoder"), dict) else "image"
    for key in ("encoder", "projector", f"{modality}_token"):
        if not isinstance(info.get(key), dict):
            raise ExportError(f"{path}: {key}: missing")
    return info


def load_projector_weights(path: Path, projector: Any, field: str) -> None:
    """Load `path` into `projector`; a file of other widths or depth is a one-line error naming `field`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ExportError(f"{field}: {path} cannot be read as safetensors ({exc})") from None
    want = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        last = max((k for k in got if k.endswith(".weight")), default=None)
        width = got[last][0] if last else "?"
        raise ExportError(f"{field}: {path} is a projector to width {width} of {len(got) // 2} layers; this one "
                          f"needs width {projector.out_dim} (the LLM's hidden size) and {projector.depth} layers")
    projector.load_state_dict(state)


def load_aligned(folder: Path) -> Aligned:
    """vlm.json, the encoder and the projector (fp32, eval); the LLM stays on disk for its own exports."""
    folder = Path(folder)
    info = read_info(folder)
    llm_config = folder / "llm" / "config.json"
    if not llm_config.is_file():
        raise ExportError(f"{folder}: llm/config.json is missing")
    width = json.loads(llm_config.read_text()).get("hidden_size")
    p = info["projector"]
    if p.get("out_dim") != width:
        raise ExportError(f"{folder / INFO}: projector.out_dim {p.get('out_dim')} does not match the LLM's "
                          f"hidden_size {width} ({llm_config})")
    encoder = E.load_saved(folder / "encoder", info["encoder"])
    projector = make_projector(int(p["in_dim"]), int(p["out_dim"]), tuple(p["grid"]), int(p["tokens"]),
                               int(p["depth"]), int(p["hidden"]), int(p.get("stack", 1)))
    load_projector_weights(folder / "projector.safetensors", projector, f"{folder / INFO}: projector")
    return Aligned(folder, info, encoder, projector.eval())
