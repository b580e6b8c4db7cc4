"""TensorRT Edge-LLM route: HF folder -> ONNX on the workstation, engine built on the Jetson.

Edge-LLM's exporter pins torch 2.13.0, transformers 5.14.1 and onnx 1.19.0, which clash with
ours, so it lives in a virtual environment of its own and runs as a subprocess. Its output is
read back here with our own onnx and safetensors and checked against the HF folder before the
stage reports success. The engine itself is built on the device by Edge-LLM's C++ `llm_build`
(TensorRT and the plugins exist only there); `device_build_command` writes that command line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import ExportError, MissingDependencyError, UserError, require
from ..fsutil import atomic_dir

EDGELLM_VERSION = "0.11.0"
EDGELLM_REQUIREMENT = f"tensorrt-edgellm[export]=={EDGELLM_VERSION}"
# Installed first, exactly as .ci/run does: this pin resolves to the CPU build here, while
# leaving torch to the extra's resolver could pull a multi-GB CUDA build.
TORCH_REQUIREMENT = "torch==2.13.0"
VENV_ENV = "VISHWAMAI_EDGE_EDGELLM_VENV"
SETUP_COMMAND = "bash .ci/install-edgellm"
EXPORT_SCRIPT = "tensorrt-edgellm-export"
LOG_NAME = "edgellm-export.log"

# `tensorrt-edgellm-export --help` (0.11.0): `--quantization {int4_awq,nvfp4}`; `--dtype` takes
# float16/fp16, bfloat16/bf16, float32/fp32 (`_dtype_from_str` in tensorrt_edgellm/scripts/export.py).
DTYPES = ("fp16", "float16", "bf16", "bfloat16", "fp32", "float32")
QUANTIZATIONS = ("int4_awq", "nvfp4")

# What the exporter writes for a text LLM (0.11.0, measured on SmolLM2): everything under llm/.
REQUIRED_FILES = ("llm/model.onnx", "llm/config.json", "llm/embedding.safetensors")
# Copied from the HF folder when it has them.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size")
OPTIONAL_CONFIG_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim")

# The HF embedding cast to fp16 must match the exported table to within fp16 rounding:
# half an fp16 ulp of the value (2^-11 relative) plus the subnormal spacing (2^-24).
EMBEDDING_RTOL = 2.0**-11
EMBEDDING_ATOL = 2.0**-24


class EdgeLLMNotInstalled(MissingDependencyError):
    """Edge-LLM's exporter venv is missing."""

    def __init__(self, venv: Path):
        UserError.__init__(
            self,
            f"TensorRT Edge-LLM's exporter is not installed in {venv}; set it up with: {SETUP_COMMAND} "
            f"(or point {VENV_ENV} at a venv that has {EDGELLM_REQUIREMENT})",
        )


def default_venv() -> Path:
    return Path(
        os.environ.get(VENV_ENV) or Path.home() / ".cache" / "vishwamai-edge" / "venvs" / "tensorrt-edgellm"
    )


def edgellm_python(venv: Path | None = None) -> Path:
    """The Edge-LLM venv's python, or a one-line error naming the setup command."""
    venv = Path(venv) if venv else default_venv()
    python = venv / "bin" / "python"
    if not python.exists() or not (venv / "bin" / EXPORT_SCRIPT).exists():
        raise EdgeLLMNotInstalled(venv)
    return python


def _exporter_runs(venv: Path) -> bool:
    script = venv / "bin" / EXPORT_SCRIPT
    if not script.exists():
        return False
    done = subprocess.run([str(script), "--help"], check=False, capture_output=True, env=_clean_env())
    return done.returncode == 0


def setup_venv(path: Path | None = None, python: str | None = None) -> Path:
    """Create the Edge-LLM venv (the steps of .ci/install-edgellm); a no-op when it already works.

    The 0.11.0 wheel is built for CPython 3.11 only, so `python` (default: ours) must be 3.11.
    """
    venv = Path(path) if path else default_venv()
    if _exporter_runs(venv):
        return venv
    steps = [
        [python or sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", TORCH_REQUIREMENT],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", EDGELLM_REQUIREMENT],
    ]
    venv.parent.mkdir(parents=True, exist_ok=True)
    for step in steps:
        done = subprocess.run(step, check=False, env=_clean_env())
        if done.returncode != 0:
            raise UserError(
                f"setting up the Edge-LLM venv failed at `{' '.join(step)}` (exit {done.returncode})"
            )
    if not _exporter_runs(venv):
        raise UserError(f"{venv}/bin/{EXPORT_SCRIPT} does not run after installing {EDGELLM_REQUIREMENT}")
    return venv


def _clean_env() -> dict[str, str]:
    """Our environment minus what would leak our packages into Edge-LLM's interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@dataclass
class EdgeLLMExport:
    """A checked Edge-LLM export folder and the numbers for the bundle manifest."""

    path: Path
    tool: str
    tool_version: str
    dtype: str
    quantization: str | None
    seconds: float
    files: dict[str, int]  # path relative to `path` -> bytes
    opset: int
    onnx_version: str  # ours, which parsed the graph
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    nodes: int = 0
    attention_plugins: int = 0
    quantized_nodes: int = 0
    external_data_bytes: int = 0
    config: dict = field(default_factory=dict)  # the fields checked against the HF config
    embedding_shape: tuple[int, int] = (0, 0)
    embedding_max_abs_diff: float = 0.0
    embedding_tolerance: str = (
        f"|exported - hf| <= {EMBEDDING_RTOL:g}*|hf| + {EMBEDDING_ATOL:g} (fp16 rounding)"
    )

    @property
    def llm_dir(self) -> Path:
        return self.path / "llm"

    @property
    def log(self) -> Path:
        return self.path / LOG_NAME

    def manifest(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["embedding_shape"] = list(self.embedding_shape)
        return data


def export_edgellm(
    hf_dir: Path,
    out_dir: Path,
    dtype: str = "fp16",
    quantization: str | None = None,
    venv: Path | None = None,
    timeout_s: float = 3600,
) -> EdgeLLMExport:
    """Run `tensorrt-edgellm-export` on an HF folder into `out_dir`, then check the result.

    The tool writes into a temporary sibling, its output streamed to edgellm-export.log there;
    only a checked folder is renamed to `out_dir`. A failed run leaves `out_dir` untouched and
    keeps the log as `<out_dir>.failed.log`.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ExportError(f"unknown Edge-LLM dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ExportError(
            f"unknown Edge-LLM quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}"
        )
    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"{hf_dir} has no config.json; Edge-LLM exports a Hugging Face model folder")
    python = edgellm_python(venv)
    script = python.parent / EXPORT_SCRIPT

    with atomic_dir(out_dir) as tmp:  # only a checked export is renamed to out_dir
        log = tmp / LOG_NAME
        cmd = [str(script), str(hf_dir.resolve()), str(tmp), "--dtype", dtype]
        if quantization:
            cmd += ["--quantization", quantization]
        start = time.monotonic()
        with open(log, "w") as sink:
            sink.write("$ " + " ".join(cmd) + "\n")
            sink.flush()
            try:
                rc = subprocess.run(cmd, check=False, stdout=sink, stderr=subprocess.STDOUT, env=_clean_env(),
                                    timeout=timeout_s).returncode
            except subprocess.TimeoutExpired:
                rc = None
        seconds = time.monotonic() - start
        if rc != 0:
            failed = _keep_log(log, out_dir)
            what = f"timed out after {timeout_s:.0f} s" if rc is None else f"failed (exit {rc})"
            raise ExportError(
                f"{EXPORT_SCRIPT} {what} on {hf_dir}{_model_type(failed)}: {_reason(failed)} (log: {failed})"
            )
        try:
            result = check_edgellm_export(tmp, hf_dir)
        except ExportError as exc:
            failed = _keep_log(log, out_dir)
            raise ExportError(f"{exc} (log: {failed})") from None
        if quantization and result.quantized_nodes == 0:
            failed = _keep_log(log, out_dir)
            raise ExportError(
                f"{EXPORT_SCRIPT} --quantization {quantization} wrote no quantized layers for {hf_dir}: "
                f"Edge-LLM 0.11 takes INT4 from a checkpoint that is already quantized (log: {failed})"
            )
    result.path = out_dir
    result.dtype, result.quantization, result.seconds = dtype, quantization, round(seconds, 1)
    result.tool = " ".join([EXPORT_SCRIPT, "HF_DIR", "OUT", *cmd[3:]])
    return result


def _keep_log(log: Path, out_dir: Path) -> Path:
    kept = out_dir.with_name(f"{out_dir.name}.failed.log")
    shutil.copyfile(log, kept)
    return kept


def _model_type(log: Path) -> str:
    """The architecture the tool saw, from its banner line `Model type    : gpt2`."""
    for line in log.read_text(errors="replace").splitlines():
        if "Model type" in line and ":" in line:
            return f" (model type {line.rsplit(':', 1)[1].strip()})"
    return ""


def _reason(log: Path) -> str:
    """The tool's own reason from its log: the exception line, else the last ERROR, else the last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return line[:300]
    for line in reversed(lines):
        if " ERROR " in line or line.startswith("ERROR") or "error:" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def check_edgellm_export(export_dir: Path, hf_dir: Path) -> EdgeLLMExport:
    """Check an Edge-LLM export folder against its HF source; raise ExportError on any mismatch."""
    onnx = require("onnx", "build")
    export_dir, hf_dir = Path(export_dir), Path(hf_dir)
    llm = export_dir / "llm"
    required = list(REQUIRED_FILES) + [f"llm/{name}" for name in COPIED_FILES if (hf_dir / name).is_file()]
    missing = [name for name in required if not (export_dir / name).is_file()]
    if missing:
        raise ExportError(f"Edge-LLM export {export_dir} lacks {', '.join(missing)}")

    try:
        model = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 -- a protobuf error our onnx cannot get past
        raise ExportError(
            f"onnx {onnx.__version__} cannot parse {llm / 'model.onnx'} (Edge-LLM 0.11 writes opset 24; "
            f"ours supports up to {onnx.defs.onnx_opset_version()}): {exc}"
        ) from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    graph = model.graph
    external = _external_data_bytes(graph, llm)

    hf_config = _text_config(json.loads((hf_dir / "config.json").read_text()))
    ours = json.loads((llm / "config.json").read_text())
    config = {}
    for name in CONFIG_FIELDS + OPTIONAL_CONFIG_FIELDS:
        if name in CONFIG_FIELDS and (name not in hf_config or name not in ours):
            raise ExportError(f"{name} is missing from {hf_dir / 'config.json'} or {llm / 'config.json'}")
        if name in hf_config and name in ours:
            if ours[name] != hf_config[name]:
                raise ExportError(
                    f"Edge-LLM config.json has {name}={ours[name]}, the HF config {hf_config[name]}"
                )
            config[name] = ours[name]
    hidden, vocab = config["hidden_size"], config["vocab_size"]

    inputs, outputs = [_value_info(v) for v in graph.input], [_value_info(v) for v in graph.output]
    embeds = next((v for v in inputs if v["name"] == "inputs_embeds"), None)
    if embeds is None or embeds["shape"][-1] != hidden:
        raise ExportError(f"the Edge-LLM graph has no inputs_embeds input of width {hidden}: {embeds}")
    logits = next((v for v in outputs if v["name"] == "logits"), None)
    if logits is None or logits["shape"][-1] != vocab:
        raise ExportError(f"the Edge-LLM graph has no logits output over {vocab} tokens: {logits}")
    attention = sum(1 for n in graph.node if n.op_type == "AttentionPlugin")
    if attention == 0:
        raise ExportError(f"the Edge-LLM graph {llm / 'model.onnx'} has no AttentionPlugin node")

    shape, max_diff = _check_embedding(llm / "embedding.safetensors", hf_dir, vocab, hidden)
    files = {
        str(p.relative_to(export_dir)): p.stat().st_size for p in sorted(export_dir.rglob("*")) if p.is_file()
    }
    return EdgeLLMExport(
        path=export_dir,
        tool=EXPORT_SCRIPT,
        tool_version=str(ours.get("edgellm_version", "")),
        dtype="",
        quantization=None,
        seconds=0.0,
        files=files,
        opset=opset,
        onnx_version=onnx.__version__,
        inputs=inputs,
        outputs=outputs,
        nodes=len(graph.node),
        attention_plugins=attention,
        quantized_nodes=sum(1 for n in graph.node if _is_quantized(n)),
        external_data_bytes=external,
        config=config,
        embedding_shape=shape,
        embedding_max_abs_diff=max_diff,
    )


def _text_config(config: dict) -> dict:
    """A multimodal config keeps the LLM's sizes in text_config."""
    return config["text_config"] if "hidden_size" not in config and "text_config" in config else config


def _value_info(value) -> dict:
    import onnx

    t = value.type.tensor_type
    return {
        "name": value.name,
        "shape": [d.dim_param or d.dim_value for d in t.shape.dim],
        "dtype": onnx.TensorProto.DataType.Name(t.elem_type),
    }


def _is_quantized(node) -> bool:
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return True
    return bool(node.domain) and any(k in node.op_type for k in ("Int4", "Int8", "Fp8", "Nvfp4", "Fp4"))


def _external_data_bytes(graph, folder: Path) -> int:
    """Every initializer stored outside model.onnx must lie inside its (present) data file."""
    import onnx

    total, sizes = 0, {}
    for tensor in graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if location not in sizes:
            path = folder / location
            if not path.is_file():
                raise ExportError(f"the Edge-LLM graph needs {path}, which is missing")
            sizes[location] = path.stat().st_size
        offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        if offset + length > sizes[location]:
            raise ExportError(
                f"{folder / location} is truncated: {tensor.name} ends at {offset + length} bytes"
            )
        total += length
    return total


def _check_embedding(path: Path, hf_dir: Path, vocab: int, hidden: int) -> tuple[tuple[int, int], float]:
    safetensors = require("safetensors", "build")
    with safetensors.safe_open(str(path), "np") as f:
        keys = list(f.keys())
        if len(keys) != 1:
            raise ExportError(f"{path} should hold one embedding table, it holds {keys}")
        table = f.get_tensor(keys[0])
    if table.shape != (vocab, hidden):
        raise ExportError(f"{path} has shape {table.shape}, expected (vocab, hidden) = ({vocab}, {hidden})")
    reference = _hf_embedding(hf_dir)
    if reference.shape != table.shape:
        raise ExportError(f"{path} has shape {table.shape}, the HF embedding {reference.shape}")
    diff = np.abs(table.astype(np.float32) - reference)
    bad = diff > EMBEDDING_RTOL * np.abs(reference) + EMBEDDING_ATOL
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ExportError(
            f"{path} differs from the HF embedding beyond fp16 rounding "
            f"({int(bad.sum())} values, first in row {row}, "
            f"max abs diff {float(diff.max()):.3g})"
        )
    return (int(table.shape[0]), int(table.shape[1])), float(diff.max())


def _hf_embedding(hf_dir: Path) -> np.ndarray:
    """The HF token embedding as float32 (torch reads bf16, which numpy cannot)."""
    safetensors = require("safetensors", "build")
    for shard in sorted(hf_dir.glob("*.safetensors")):
        with safetensors.safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118 -- safe_open is no dict
                if key.endswith("embed_tokens.weight") or key in ("transformer.wte.weight", "wte.weight"):
                    return f.get_tensor(key).float().numpy()
    raise ExportError(f"no token embedding (*embed_tokens.weight) in the safetensors of {hf_dir}")


def device_build_command(
    export_dir_on_device: str | PurePosixPath,
    engine_dir: str | PurePosixPath,
    max_input_len: int,
    max_seq_len: int,
    max_batch: int,
    llm_build: str = "llm_build",
) -> list[str]:
    """The command that builds the TensorRT engine from this export on the Jetson.

    `llm_build` is Edge-LLM's C++ example binary (examples/llm/llm_build.cpp, built on the
    device as build/examples/llm/llm_build; it is not in the Python wheel, whose only builder is
    the experimental ONNX-less `tensorrt-edgellm-build`). Its flags are the getopt long options
    of `parseLLMBuildArgs` in that file (NVIDIA/TensorRT-Edge-LLM; also published at
    nvidia.github.io/TensorRT-Edge-LLM/_downloads/.../llm_build.cpp, and shown in the docs'
    Examples page): --onnxDir (folder with model.onnx and config.json: the export's llm/),
    --engineDir, --maxInputLen, --maxKVCacheCapacity (the longest prompt + generation the KV
    cache holds), --maxBatchSize. There is no precision flag: precision is the ONNX's (fp16
    here, INT4/FP8 from a quantized checkpoint).
    """
    if not 0 < max_input_len <= max_seq_len:
        raise ExportError(
            f"max_input_len {max_input_len} must be positive and at most max_seq_len {max_seq_len}"
        )
    if max_batch < 1:
        raise ExportError(f"max_batch must be at least 1, not {max_batch}")
    return [
        llm_build,
        f"--onnxDir={PurePosixPath(export_dir_on_device) / 'llm'}",
        f"--engineDir={PurePosixPath(engine_dir)}",
        f"--maxInputLen={max_input_len}",
        f"--maxKVCacheCapacity={max_seq_len}",
        f"--maxBatchSize={max_batch}",
    ]
