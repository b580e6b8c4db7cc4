"""TensorRT-LLM engine plan: the `trtllm-build` settings for one target, and the script that builds it.

Engines are built where they run (an engine is tied to the GPU, the TensorRT version and the
TensorRT-LLM version), so the workstation writes `plan.json` + `build.sh` next to the checkpoint
and the device (the L4T image of Dockerfile.l4t built with WITH_TRTLLM=1, or an x86-64 CUDA box)
runs the script. `run_build` runs it at once where TensorRT-LLM is installed.

The numbers follow stated rules:
- max_batch_size per target (BATCH_SIZES): 1 where 8-16 GB of shared memory hold one sequence,
  4 on an AGX Orin, 8 on a discrete GPU.
- max_seq_len is the recipe's context (runtime.n_ctx); max_input_len = n_ctx - 1 (the session
  refuses a prompt that fills the context; image rows count as input tokens, they are fake ids).
- max_num_tokens = max_input_len + max_batch_size: one full prompt in its context phase while
  every other sequence decodes a token in the same step (no chunked context: a prompt is never
  split, so less than max_input_len would refuse long prompts).
- the KV cache: TensorRT-LLM's runtime takes `kv_cache_free_gpu_mem_fraction` of the memory free
  once the engine is loaded (free = available - weights - runtime overhead, from memory_plan).
  Encoders (ONNX Runtime) load after the LLM in Pipeline.load and need their share of what is
  free, so the KV budget is free - encoders, capped at what max_batch_size full sequences need
  (+10% for block rounding: on a Jetson the memory is shared with the OS, grabbing more starves
  it), as a fraction of free, clamped to [0.1, 0.9].
- multimodal: max_prompt_embedding_table_size (alias --max_multimodal_len) = max images per
  request x rows per image x max_batch_size, as TensorRT-LLM's multimodal README computes it
  ("1 (max_batch_size) * 576 (num_visual_features)" for LLaVA-1.5).

TensorRT-LLM facts this rests on (from memory of its sources, not checked against them here;
confidence in brackets):
- trtllm-build (tensorrt_llm/commands/build.py) in v0.12 and later takes --checkpoint_dir,
  --output_dir, --max_batch_size, --max_input_len, --max_seq_len, --max_num_tokens,
  --max_beam_width, --gpt_attention_plugin, --gemm_plugin, --remove_input_padding,
  --context_fmha (enable/disable), --max_prompt_embedding_table_size with the alias
  --max_multimodal_len, --gather_generation_logits [high].
  --max_output_len is the pre-0.11 spelling (deprecated for --max_seq_len) [high]; not used.
- the paged KV cache is `--paged_kv_cache enable` in v0.12; later releases (about 0.14 on)
  replaced it with `--kv_cache_type paged` [medium-high]. That is the one flag that differs.
- a W4A16_AWQ checkpoint (config.json quantization.quant_algo) needs no quantization flag at
  build time: trtllm-build takes the quantization from the checkpoint and uses the weight-only
  groupwise GEMM (weight_only_groupwise_quant_matmul_plugin) for the INT4 layers; --gemm_plugin
  float16 covers the layers left in fp16 (lm_head) [medium-high: the llama README's AWQ example
  passes only --gemm_plugin].
- the engine folder holds config.json (pretrained_config, build_config) and rank0.engine [high].
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ExportError, UserError
from ..fsutil import atomic_file
from ..memory_plan import GB, ModelSize, available_gb, plan_memory
from ..targets import TargetProfile

FLAVORS = ("v0.12-jetson", "current")
BATCH_SIZES = {"orin-nano-8": 1, "orin-nx-16": 1, "orin-agx-32": 4, "orin-agx-64": 4, "x86-cuda": 8}
KV_FRACTION_RANGE = (0.1, 0.9)
KV_BLOCK_MARGIN = 1.1
PLAN_FILE, SCRIPT_FILE, MARKER_FILE = "plan.json", "build.sh", "build.json"
ENGINE_FILE = "rank0.engine"  # one GPU, no tensor parallelism


@dataclass(frozen=True)
class EnginePlan:
    model: str
    target: str
    cuda_arch: str
    fmt: str  # "int4_awq" (W4A16 AWQ checkpoint) or "fp16"
    dtype: str
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    max_beam_width: int
    gpt_attention_plugin: str
    gemm_plugin: str
    weight_only: str | None  # how the INT4 weights are computed, for the record (no flag)
    paged_kv_cache: bool
    remove_input_padding: bool
    context_fmha: bool
    gather_generation_logits: bool  # needed by backend.logits(); costs vocab x batch fp32 per step
    max_prompt_embedding_table_size: int  # 0 for text-only
    max_images_per_request: int
    rows_per_image: int
    kv_cache_free_gpu_mem_fraction: float  # a runtime setting (ModelRunnerCpp), not a build flag
    kv_cache_budget_gb: float
    kv_cache_needed_gb: float  # max_batch_size full sequences
    kv_cache_tokens: int  # what the budget holds, over all sequences
    free_after_engine_gb: float
    fits: bool  # the memory plan's verdict for one sequence

    @property
    def default_flavor(self) -> str:
        return "current" if self.target == "x86-cuda" else "v0.12-jetson"

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "default_flavor": self.default_flavor}, indent=2) + "\n"

    def build_command(self, ckpt_dir: str | Path, engine_dir: str | Path, flavor: str | None = None) -> list[str]:
        flavor = flavor or self.default_flavor
        if flavor not in FLAVORS:
            raise UserError(f"unknown trtllm-build flavour {flavor!r}; known: {', '.join(FLAVORS)}")
        on = {True: "enable", False: "disable"}
        cmd = [
            "trtllm-build",
            "--checkpoint_dir", str(ckpt_dir),
            "--output_dir", str(engine_dir),
            "--max_batch_size", str(self.max_batch_size),
            "--max_input_len", str(self.max_input_len),
            "--max_seq_len", str(self.max_seq_len),
            "--max_num_tokens", str(self.max_num_tokens),
            "--max_beam_width", str(self.max_beam_width),
            "--gpt_attention_plugin", self.gpt_attention_plugin,
            "--gemm_plugin", self.gemm_plugin,
            "--remove_input_padding", on[self.remove_input_padding],
            "--context_fmha", on[self.context_fmha],
        ]
        if flavor == "v0.12-jetson":
            cmd += ["--paged_kv_cache", on[self.paged_kv_cache]]
        else:
            cmd += ["--kv_cache_type", "paged" if self.paged_kv_cache else "continuous"]
        if self.max_prompt_embedding_table_size:
            # the spelling of TensorRT-LLM's multimodal README in both flavours; an alias of
            # --max_prompt_embedding_table_size
            cmd += ["--max_multimodal_len", str(self.max_prompt_embedding_table_size)]
        if self.gather_generation_logits:
            cmd += ["--gather_generation_logits"]
        return cmd


def plan_engine(
    size: ModelSize,
    target: TargetProfile,
    n_ctx: int,
    fmt: str = "int4_awq",
    max_images_per_request: int | None = None,
    rows_per_image: int | None = None,
    encoder_dtype: str = "fp16",
    gather_generation_logits: bool = False,
) -> EnginePlan:
    if "trtllm" not in target.backends or target.name not in BATCH_SIZES or not target.cuda_arch:
        raise UserError(f"target {target.name} has no TensorRT-LLM backend; targets with one: {', '.join(BATCH_SIZES)}")
    if fmt not in ("int4_awq", "fp16"):
        raise UserError(f"TensorRT-LLM engines are planned for int4_awq or fp16 checkpoints, not {fmt!r}")
    rows = size.image_tokens if rows_per_image is None else rows_per_image
    images = (1 if rows else 0) if max_images_per_request is None else max_images_per_request
    batch = BATCH_SIZES[target.name]
    max_input_len = n_ctx - 1
    if images * rows > max_input_len:
        raise UserError(f"{images} image(s) of {rows} rows do not fit a {n_ctx}-token context")

    mem = plan_memory(size, target, fmt, n_ctx, backend="trtllm", encoder_dtype=encoder_dtype, suggest=False)
    free = available_gb(target) - mem.weights_gb - mem.overhead_gb
    needed = size.kv_bytes(n_ctx) * batch / GB
    budget = min(free - mem.encoder_gb, needed * KV_BLOCK_MARGIN)
    lo, hi = KV_FRACTION_RANGE
    fraction = lo if free <= 0 else min(hi, max(lo, budget / free))
    budget = max(free, 0.0) * fraction
    per_token = size.kv_bytes(1) / GB
    return EnginePlan(
        model=size.name, target=target.name, cuda_arch=target.cuda_arch, fmt=fmt, dtype="float16",
        max_batch_size=batch, max_input_len=max_input_len, max_seq_len=n_ctx,
        max_num_tokens=max_input_len + batch, max_beam_width=1,
        gpt_attention_plugin="float16", gemm_plugin="float16",
        weight_only=("W4A16_AWQ from the checkpoint's quantization.quant_algo: weight-only groupwise "
                     "INT4 GEMM (weight_only_groupwise_quant_matmul_plugin), group 128, chosen by "
                     "trtllm-build itself") if fmt == "int4_awq" else None,
        paged_kv_cache=True, remove_input_padding=True, context_fmha=True,
        gather_generation_logits=gather_generation_logits,
        max_prompt_embedding_table_size=images * rows * batch,
        max_images_per_request=images, rows_per_image=rows,
        kv_cache_free_gpu_mem_fraction=round(fraction, 3),
        kv_cache_budget_gb=round(budget, 3), kv_cache_needed_gb=round(needed, 3),
        kv_cache_tokens=int(budget / per_token) if per_token else 0,
        free_after_engine_gb=round(free, 3), fits=mem.fits,
    )


def build_script(plan: EnginePlan, ckpt_dir: str = "trtllm-ckpt", engine_dir: str = "engine",
                 flavor: str | None = None) -> str:
    """A bash script that builds `engine_dir` from `ckpt_dir` (both relative to the script's folder,
    or to $BUNDLE_DIR). trtllm-build writes into a temporary sibling, which gets the marker and is
    then renamed: an engine folder with build.json is a complete one."""
    flavor = flavor or plan.default_flavor
    partial = partial_dir(engine_dir)
    cmd = plan.build_command(ckpt_dir, partial, flavor)
    marker = {"ok": True, "model": plan.model, "target": plan.target, "flavor": flavor, "command": cmd}
    q = shlex.quote
    return f"""#!/usr/bin/env bash
# Builds the TensorRT-LLM engine of {plan.model} for {plan.target} ({flavor} trtllm-build).
# Run it inside the L4T image built with WITH_TRTLLM=1 (Dockerfile.l4t) or on an x86-64 CUDA box
# with NVIDIA's tensorrt_llm wheel. Written by vishwamai_edge.export.engine_plan; see plan.json.
set -euo pipefail

bundle_dir="${{BUNDLE_DIR:-$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)}}"
cd "$bundle_dir"
ckpt={q(str(ckpt_dir))}
engine={q(str(engine_dir))}
partial={q(partial)}

if ! command -v trtllm-build >/dev/null 2>&1; then
    echo "build.sh: trtllm-build not found on PATH; run this inside the vishwamai-edge L4T image built" \\
        "with --build-arg WITH_TRTLLM=1, or install NVIDIA's tensorrt_llm wheel on an x86-64 CUDA machine" >&2
    exit 127
fi
if [ ! -f "$ckpt/config.json" ]; then
    echo "build.sh: no TensorRT-LLM checkpoint at $bundle_dir/$ckpt (config.json missing)" >&2
    exit 2
fi

rm -rf "$partial"
{" ".join(q(a) for a in cmd)}

if [ ! -f "$partial/{ENGINE_FILE}" ] || [ ! -f "$partial/config.json" ]; then
    echo "build.sh: trtllm-build finished but $partial has no {ENGINE_FILE} and config.json" >&2
    exit 1
fi
version="$(python3 -c 'import tensorrt_llm; print(tensorrt_llm.__version__)' 2>/dev/null || echo unknown)"
cat > "$partial/{MARKER_FILE}" <<'EOF'
{json.dumps(marker)[:-1]},
EOF
printf '"tensorrt_llm": "%s", "finished_utc": "%s"}}\\n' "$version" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \\
    >> "$partial/{MARKER_FILE}"
rm -rf "$engine"
mv "$partial" "$engine"
echo "build.sh: engine written to $bundle_dir/$engine"
"""


def partial_dir(engine_dir: str | Path) -> str:
    engine_dir = Path(engine_dir)
    return str(engine_dir.with_name(f".{engine_dir.name}.tmp-build"))


def trtllm_available() -> bool:
    """Without importing it: `import tensorrt_llm` pulls in torch and initialises CUDA."""
    return importlib.util.find_spec("tensorrt_llm") is not None and shutil.which("trtllm-build") is not None


def run_build(plan: EnginePlan, out_dir: Path, ckpt_dir: str = "trtllm-ckpt", engine_dir: str = "engine",
              flavor: str | None = None, build: bool | None = None,
              run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> dict[str, Any]:
    """Write plan.json and build.sh into `out_dir`; run the script when TensorRT-LLM is here
    (`build` None) or when asked. Returns what was written and whether an engine was built."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / PLAN_FILE) as tmp:
        tmp.write_text(plan.to_json())
    script = out_dir / SCRIPT_FILE
    with atomic_file(script) as tmp:
        tmp.write_text(build_script(plan, ckpt_dir, engine_dir, flavor))
        tmp.chmod(0o755)
    result: dict[str, Any] = {"plan": str(out_dir / PLAN_FILE), "script": str(script), "built": False}
    if not (trtllm_available() if build is None else build):
        return result
    proc = run(["bash", str(script)], cwd=out_dir, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise ExportError(f"the TensorRT-LLM engine build failed (exit {proc.returncode}): {tail[0]}")
    marker = out_dir / engine_dir / MARKER_FILE
    if not marker.is_file():
        raise ExportError(f"the TensorRT-LLM engine build reported success but wrote no {marker}")
    result.update(built=True, engine_dir=str(out_dir / engine_dir), marker=json.loads(marker.read_text()))
    return result
