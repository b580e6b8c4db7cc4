"""The bundle manifest as types: the build writes it through these models and the device reads it through
them, so a section has one shape in both places.

Every section keeps the fields it does not name (check numbers, an exporter's details): they are reported,
never relied on. Schema 2 names what schema 1 left implicit: the prompt planner (`llm.prompt`), each
encoder's kind, and the target's run-time defaults (`runtime.parallel`, `runtime.draft_max`). A schema-1
bundle loads through `migrate`; any other schema is refused in one line that says to rebuild.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

SCHEMA_VERSION = 2
READS = (1, 2)  # the schemas this runtime loads (1 through `migrate`)


class Section(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_serializer(mode="wrap")
    def _absent_stays_absent(self, handler: Any) -> dict[str, Any]:
        # an optional field the writer left out is not written as null or empty (a LLaVA bundle without an
        # mmproj has no `mmproj` key, a bundle without adapters no `adapters`); one it set is written as it was
        data = handler(self)
        return {k: v for k, v in data.items() if k in self.model_fields_set or v not in (None, {}, [])}


class FileEntry(Section):
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Placeholder(Section):
    """What stands for an image (audio clip) in the rendered prompt: a vocabulary token, or text with no id."""

    text: str | None = None
    id: int | None = None


class LLMSection(Section):
    file: str
    backend: str = "llamacpp"
    format: str = "gguf"
    quant: str | None = None
    tensor_types: dict[str, int] | None = None
    weights_digest: str | None = None  # what an adapter for this bundle must have been trained on
    chat_template: str | None = None  # None: the one the GGUF carries, else ChatML
    prompt: str = "token"  # the prompt planner (runtime/prompts) that places image rows
    # whether text right after a control token starts with SentencePiece's word-start mark: llama.cpp's way
    # and HF's legacy tokenizers'; False for models trained with `legacy=False` (VILA, llava-hf)
    space_after_special: bool = True
    image_token: Placeholder | None = None
    audio_token: Placeholder | None = None


class EncoderEntry(Section):
    """`encoders.image` / `encoders.audio`: the slot is the chat part it takes, `kind` how it runs
    (runtime/encoder_registry.py)."""

    kind: str
    file: str | None = None
    providers: list[str] = Field(default_factory=list)
    n_tokens: int | None = None
    hidden: int | None = None


class AdapterEntry(Section):
    file: str
    scale: float = 1.0
    base_digest: str | None = None


class RuntimeDefaults(Section):
    """What the device runs with unless told otherwise (the recipe's `runtime`, the target's slots)."""

    n_ctx: int = Field(2048, ge=64)
    system_prompt: str | None = None
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    speculative: Literal["off", "lookup"] = "off"
    kv_type: Literal["f16", "q8_0", "q4_0"] = "f16"
    # from the bundle's target; a manifest without them (a bare GGUF) runs as laptop-cpu does
    parallel: int = Field(default_factory=lambda: _laptop().parallel, ge=1)  # requests decoded together
    draft_max: int = Field(default_factory=lambda: _laptop().draft_max, ge=1)  # draft tokens verified per step


class TargetEntry(Section):
    name: str = "laptop-cpu"
    memory_gb: float | None = None
    memory_bandwidth_gbs: float | None = None
    cuda_arch: str | None = None


class Manifest(Section):
    schema_version: Literal[2] = SCHEMA_VERSION
    name: str
    recipe: str | None = None
    created: str | None = None
    target: TargetEntry = Field(default_factory=TargetEntry)
    backends: list[str] = Field(default_factory=lambda: ["llamacpp"])
    llm: LLMSection
    encoders: dict[str, EncoderEntry] = Field(default_factory=dict)
    adapters: dict[str, AdapterEntry] = Field(default_factory=dict)
    runtime: RuntimeDefaults = Field(default_factory=RuntimeDefaults)
    checks: dict[str, dict[str, Any]] = Field(default_factory=dict)
    memory_plan: dict[str, Any] | None = None
    engines: dict[str, dict[str, Any]] = Field(default_factory=dict)
    mmproj: dict[str, Any] | None = None
    source: dict[str, Any] | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    files: dict[str, FileEntry] = Field(default_factory=dict)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _laptop() -> Any:
    from ..targets import TARGETS

    return TARGETS["laptop-cpu"]


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 manifest as schema 2: the planner, the encoder kinds and the target's defaults that its
    readers used to work out on the device, written down. Returns a new dict; the file is not changed."""
    from ..targets import TARGETS

    data = {**data, "schema_version": 2}
    llm = dict(data.get("llm") or {})
    encoders = {slot: dict(entry) for slot, entry in (data.get("encoders") or {}).items() if isinstance(entry, dict)}
    image = encoders.get("image")
    if image is not None:
        image.setdefault("kind", "vision")
        placeholder = llm.get("image_token") or {}
        if image["kind"] == "minicpmv":
            llm.setdefault("prompt", "sliced")
        elif placeholder.get("text") and placeholder.get("id") is None:
            llm.setdefault("prompt", "text")  # VILA's placeholder text
    audio = encoders.get("audio")
    if audio is not None:
        audio.setdefault("kind", "audio-embeddings" if audio.get("mode") == "embeddings" else "speech-to-text")
    target = data.get("target") if isinstance(data.get("target"), dict) else {}
    profile = TARGETS.get(target.get("name") or "laptop-cpu", TARGETS["laptop-cpu"])
    runtime = dict(data.get("runtime") or {})
    runtime.setdefault("parallel", profile.parallel)
    runtime.setdefault("draft_max", profile.draft_max)
    return {**data, "llm": llm, "encoders": encoders, "runtime": runtime}
