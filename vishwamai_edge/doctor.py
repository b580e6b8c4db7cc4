"""`vishwamai-edge doctor`: what is this machine, and which backends can run here.

Files are read relative to `root` so tests can point `collect()` at a recorded tree
(tests/data/jetson/...). Python packages (llama_cpp, onnxruntime, tensorrt, ...) are
always those of the running interpreter: a tree of files cannot stand in for them.

Nothing heavy is imported at module level: this runs on devices without torch and is
the container's health check, so it must start fast and never crash. Every probe
catches its own failures and reports "unknown" (file unreadable) or "not installed".
"""

from __future__ import annotations

import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .jetson import (
    JETSON_MODULES,
    UNKNOWN,
    JetsonModule,
    jetpack_for_l4t,
    module_for_compatible,
    module_for_memory,
    module_for_model,
    parse_l4t_release,
)
from .targets import TARGETS

if TYPE_CHECKING:
    from rich.console import Console

NOT_INSTALLED = "not installed"
NOT_JETSON = "not a Jetson"


DEVICE_TREE_DIRS = ("/proc/device-tree", "/run/vishwamai-edge/device-tree")


def _device_tree_dir(root: Path) -> Path:
    for absolute in DEVICE_TREE_DIRS:
        candidate = _under(root, absolute)
        try:
            if (candidate / "model").exists() or (candidate / "compatible").exists():
                return candidate
        except OSError:  # unreadable: let the reads below report "unknown"
            return candidate
    return _under(root, DEVICE_TREE_DIRS[0])


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


@dataclass
class BackendStatus:
    name: str  # "llamacpp", "trtllm", "onnxruntime"
    kind: str  # "llm" (runs the language model) or "encoder" (vision / audio towers)
    usable: bool
    reason: str


@dataclass
class DoctorReport:
    system: str  # "Linux aarch64"
    python: str
    jetson: bool
    device_model: str  # /proc/device-tree/model, NOT_JETSON or UNKNOWN
    module: str  # "Jetson AGX Orin 64GB", NOT_JETSON or UNKNOWN
    part_number: str  # "p3701-0005" or UNKNOWN
    l4t: str  # "36.4.3" or UNKNOWN
    jetpack: str  # "6.2", "6.x" or UNKNOWN
    memory_gib: float | None  # MemTotal; None when /proc/meminfo cannot be read
    gpu: str
    cuda: str
    tensorrt: str
    tensorrt_llm: str
    onnxruntime: str
    onnxruntime_providers: list[str]
    llama_cpp: str
    llama_cpp_gpu_offload: bool | None  # None when llama_cpp is not importable
    nvml: str
    backends: list[BackendStatus]
    recommended_target: str
    notes: list[str] = field(default_factory=list)

    @property
    def any_llm_backend_usable(self) -> bool:
        # only a backend the runtime can drive counts: an installed engine toolkit alone runs no bundle
        return any(b.usable and b.name in runtime_backends() for b in self.backends if b.kind == "llm")

    def backend(self, name: str) -> BackendStatus:
        return next(b for b in self.backends if b.name == name)


# ---------------------------------------------------------------------------------------------
# Probes: each returns a value or UNKNOWN / NOT_INSTALLED, never raises
# ---------------------------------------------------------------------------------------------


def _under(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


def _read_text(path: Path) -> str | None:
    """File text without device-tree NULs at the ends; None if absent, UNKNOWN if unreadable."""
    try:
        return path.read_bytes().decode("utf-8", "replace").strip("\0\n ")
    except FileNotFoundError:
        return None
    except OSError:
        return UNKNOWN


def _memory_gib(root: Path) -> float | None:
    text = _read_text(_under(root, "/proc/meminfo"))
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text or "", re.MULTILINE)
    return round(int(m.group(1)) / 1024**2, 1) if m else None


def _cuda_version(root: Path) -> str:
    # version.json exists since CUDA 11.1 (JetPack 5 and 6 both ship it); version.txt before.
    for cuda_dir in [_under(root, "/usr/local/cuda"), *sorted(_under(root, "/usr/local").glob("cuda-*"))]:
        text = _read_text(cuda_dir / "version.json")
        if text == UNKNOWN:
            return UNKNOWN
        if text:
            try:
                return str(json.loads(text)["cuda"]["version"])
            except (ValueError, KeyError, TypeError):
                return UNKNOWN
        text = _read_text(cuda_dir / "version.txt")
        if text and text != UNKNOWN:
            m = re.search(r"CUDA Version\s+(\S+)", text)
            return m.group(1) if m else UNKNOWN
    if root == Path("/"):  # nvcc on PATH describes this machine only, not a recorded tree
        nvcc = shutil.which("nvcc")
        if nvcc:
            try:
                run = subprocess.run(
                    [nvcc, "--version"], capture_output=True, text=True, timeout=10, check=False
                )
            except (OSError, subprocess.SubprocessError):
                return UNKNOWN
            m = re.search(r"release [\d.]+, V(\S+)", run.stdout)
            return m.group(1) if m else UNKNOWN
    return NOT_INSTALLED


def _discrete_gpus(root: Path) -> list[str]:
    """NVIDIA GPUs the kernel driver sees (/proc/driver/nvidia/gpus/<pci id>/information)."""
    names = []
    try:
        gpu_dirs = sorted(_under(root, "/proc/driver/nvidia/gpus").iterdir())
    except OSError:
        return []
    for gpu_dir in gpu_dirs:
        text = _read_text(gpu_dir / "information") or ""
        m = re.search(r"^Model:\s*(.+)$", text, re.MULTILINE)
        names.append(m.group(1).strip() if m else UNKNOWN)
    return names


def _driver_version(root: Path) -> str:
    text = _read_text(_under(root, "/proc/driver/nvidia/version"))
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text or "")
    return m.group(1) if m else UNKNOWN


def _dist_version(*dists: str) -> str | None:
    import importlib.metadata  # ~50 ms of imports (email.*): only when asked

    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _tensorrt(root: Path) -> str:
    if _has_module("tensorrt"):
        # JetPack installs the bindings from a .deb; some builds carry no dist metadata.
        version = _dist_version("tensorrt", "tensorrt-cu12", "tensorrt_cu12")
        return version or "installed (version unknown)"
    # The C++ library without Python bindings is still worth knowing about.
    for header in sorted(_under(root, "/usr/include").glob("*-linux-gnu/NvInferVersion.h")):
        text = _read_text(header) or ""
        parts = [re.search(rf"#define NV_TENSORRT_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
        numbers = [m.group(1) for m in parts if m]
        if len(numbers) == 3:
            return ".".join(numbers) + " (library only, no Python bindings)"
    return NOT_INSTALLED


def _onnxruntime() -> tuple[str, list[str], str]:
    """(version, providers, error). Imported lazily: it loads native libraries."""
    if not _has_module("onnxruntime"):
        return NOT_INSTALLED, [], ""
    try:
        import onnxruntime

        version = str(getattr(onnxruntime, "__version__", UNKNOWN))
        dist = "onnxruntime-gpu" if _dist_version("onnxruntime-gpu") else "onnxruntime"
        return f"{version} ({dist})", list(onnxruntime.get_available_providers()), ""
    except Exception as exc:  # a broken native library must not take doctor down with it
        return UNKNOWN, [], f"{type(exc).__name__}: {exc}"


def _llama_cpp() -> tuple[str, bool | None, str]:
    """(version, GPU offload supported, error). Importing loads libllama; still well under a second."""
    if not _has_module("llama_cpp"):
        return NOT_INSTALLED, None, ""
    try:
        import llama_cpp

        version = str(getattr(llama_cpp, "__version__", UNKNOWN))
        offload = bool(llama_cpp.llama_supports_gpu_offload())
        return version, offload, ""
    except Exception as exc:
        return UNKNOWN, None, f"{type(exc).__name__}: {exc}"


def _nvml() -> str:
    """Driver and GPUs via NVML (pip package nvidia-ml-py, module pynvml). Jetson Orin has no NVML."""
    if not _has_module("pynvml"):
        return NOT_INSTALLED
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        names = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        return f"driver {driver}; " + (", ".join(names) if names else "no GPUs")
    except Exception as exc:
        return f"error ({type(exc).__name__}: {exc})"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# collect
# ---------------------------------------------------------------------------------------------


def collect(root: Path = Path("/")) -> DoctorReport:
    root = Path(root)
    notes: list[str] = []
    memory_gib = _memory_gib(root)

    # -- Jetson: device tree and L4T release
    dt_dir = _device_tree_dir(root)
    model_text = _read_text(dt_dir / "model")
    compatible = _read_text(dt_dir / "compatible")
    release_text = _read_text(_under(root, "/etc/nv_tegra_release"))

    if release_text is None:
        l4t = NOT_JETSON
    elif release_text == UNKNOWN:
        l4t = UNKNOWN
    else:
        l4t = parse_l4t_release(release_text)
    tegra = (
        l4t != NOT_JETSON
        or bool(compatible and compatible != UNKNOWN and "tegra" in compatible)
        or bool(model_text and model_text != UNKNOWN and "jetson" in model_text.lower())
    )
    if tegra and l4t == NOT_JETSON:
        l4t = UNKNOWN  # a Jetson without /etc/nv_tegra_release
    jetpack = jetpack_for_l4t(l4t) if l4t not in (UNKNOWN, NOT_JETSON) else l4t
    orin = bool(compatible and "tegra234" in compatible) or l4t.startswith("36.")  # JetPack 6: Orin only

    module: JetsonModule | None = None
    part = module_for_compatible(compatible) if compatible and compatible != UNKNOWN else None
    if part in JETSON_MODULES:
        module = JETSON_MODULES[part]
    elif tegra and model_text and model_text != UNKNOWN:
        module = module_for_model(model_text, memory_gib)
        if module:
            notes.append("module size inferred from total memory (no SKU in the device tree's compatible)")
    elif tegra and model_text is None and orin:
        # Docker masks /sys/firmware (where /proc/device-tree points) inside containers; the
        # release file and the memory size still tell the module class.
        module = module_for_memory(memory_gib)
        if module:
            notes.append(
                "device tree not visible (inside a container?): module class guessed from total memory; "
                "jetson/run.sh mounts the device tree to make it exact"
            )

    if tegra:
        device_model = model_text or UNKNOWN
        module_name = module.name if module else UNKNOWN
        if module is None:
            notes.append(f"unrecognised Jetson module ({part or device_model}); no target profile for it")
        elif module.note:
            notes.append(module.note)
        if "super" in device_model.lower():
            notes.append("flashed 'Super': the MAXN_SUPER power mode gives the full memory bandwidth")
    else:
        device_model = module_name = NOT_JETSON

    # -- GPU, CUDA and libraries
    discrete = [] if tegra else _discrete_gpus(root)
    if tegra:
        gpu = "integrated (tegra234, sm_87)" if orin else "integrated (tegra)"
    elif discrete:
        gpu = f"{', '.join(discrete)} (driver {_driver_version(root)})"
    else:
        gpu = "none found"
    has_gpu = tegra or bool(discrete)

    cuda = _cuda_version(root)
    tensorrt = _tensorrt(root)
    tensorrt_llm = NOT_INSTALLED
    if _has_module("tensorrt_llm"):
        tensorrt_llm = _dist_version("tensorrt_llm", "tensorrt-llm") or "installed (version unknown)"
    ort_version, ort_providers, ort_error = _onnxruntime()
    llama_version, llama_offload, llama_error = _llama_cpp()
    nvml = _nvml()

    # -- Backends
    backends = [
        _llamacpp_status(llama_version, llama_offload, llama_error, has_gpu, notes),
        _trtllm_status(tensorrt_llm, tensorrt, has_gpu),
        _onnxruntime_status(ort_version, ort_providers, ort_error, has_gpu, tegra, notes),
    ]

    # -- Target
    if module is not None:
        target = module.target
    elif not tegra and discrete:
        target = "x86-cuda"
        if platform.machine() not in ("x86_64", "AMD64") and root == Path("/"):
            notes.append(f"x86-cuda is the nearest profile to this {platform.machine()} machine with a GPU")
    else:
        target = "laptop-cpu"

    return DoctorReport(
        system=f"{platform.system()} {platform.machine()}",
        python=platform.python_version(),
        jetson=tegra,
        device_model=device_model,
        module=module_name,
        part_number=(part or UNKNOWN) if tegra else NOT_JETSON,
        l4t=l4t,
        jetpack=jetpack,
        memory_gib=memory_gib,
        gpu=gpu,
        cuda=cuda,
        tensorrt=tensorrt,
        tensorrt_llm=tensorrt_llm,
        onnxruntime=ort_version,
        onnxruntime_providers=ort_providers,
        llama_cpp=llama_version,
        llama_cpp_gpu_offload=llama_offload,
        nvml=nvml,
        backends=backends,
        recommended_target=target,
        notes=notes,
    )


RUNTIME_HINT = "pip install 'vishwamai-edge[runtime]'"


def _llamacpp_status(
    version: str, offload: bool | None, error: str, has_gpu: bool, notes: list[str]
) -> BackendStatus:
    def status(usable: bool, reason: str) -> BackendStatus:
        return BackendStatus("llamacpp", "llm", usable, reason)

    if version == NOT_INSTALLED:
        return status(False, f"llama-cpp-python is not installed: {RUNTIME_HINT}")
    if error:
        return status(False, f"llama_cpp fails to import: {error}")
    if offload:
        return status(True, f"llama-cpp-python {version}, GPU offload available")
    if has_gpu:
        notes.append(
            "llama-cpp-python was built without CUDA: rebuild with CMAKE_ARGS='-DGGML_CUDA=on' "
            "pip install --force-reinstall --no-cache-dir llama-cpp-python"
        )
    return status(True, f"llama-cpp-python {version}, CPU only (no GPU offload)")


def runtime_backends() -> set[str]:
    """The LLM backends the runtime has a module for (runtime/backends.BACKENDS)."""
    from .runtime.backends import BACKENDS

    return set(BACKENDS)


def _trtllm_status(tensorrt_llm: str, tensorrt: str, has_gpu: bool) -> BackendStatus:
    # Not imported: `import tensorrt_llm` pulls in torch and initialises CUDA (seconds, GBs).
    def status(usable: bool, reason: str) -> BackendStatus:
        return BackendStatus("trtllm", "llm", usable, reason)

    if "trtllm" not in runtime_backends():
        return status(False, "this vishwamai-edge has no TensorRT-LLM runtime backend yet; bundles run on llama.cpp")
    if tensorrt_llm == NOT_INSTALLED:
        return status(False, "tensorrt_llm is not installed (see README: Jetson / x86-64 CUDA)")
    if tensorrt == NOT_INSTALLED or "no Python bindings" in tensorrt:
        return status(False, f"tensorrt_llm {tensorrt_llm} found but TensorRT's Python bindings are missing")
    if not has_gpu:
        return status(False, f"tensorrt_llm {tensorrt_llm} found but no NVIDIA GPU is visible")
    return status(True, f"tensorrt_llm {tensorrt_llm} with TensorRT {tensorrt}")


def _onnxruntime_status(
    version: str, providers: list[str], error: str, has_gpu: bool, tegra: bool, notes: list[str]
) -> BackendStatus:
    def status(usable: bool, reason: str) -> BackendStatus:
        return BackendStatus("onnxruntime", "encoder", usable, reason)

    if version == NOT_INSTALLED:
        return status(False, f"onnxruntime is not installed: {RUNTIME_HINT}")
    if error:
        return status(False, f"onnxruntime fails to import: {error}")
    gpu_providers = [p for p in providers if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    if has_gpu and not gpu_providers:
        where = "the Jetson AI Lab index (pypi.jetson-ai-lab.io/jp6/cu126)" if tegra else "PyPI"
        notes.append(f"onnxruntime has no CUDA provider: install onnxruntime-gpu from {where} instead")
    return status(True, f"onnxruntime {version}; providers: {', '.join(providers) or 'none'}")


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def any_llm_backend(report: DoctorReport) -> bool:
    """What `doctor --quiet` (and the containers' HEALTHCHECK) turns into exit code 0."""
    return report.any_llm_backend_usable


def to_json(report: DoctorReport) -> dict[str, Any]:
    data = asdict(report)
    data["any_llm_backend_usable"] = report.any_llm_backend_usable
    return data


def render(report: DoctorReport, console: Console) -> None:
    from rich.markup import escape
    from rich.table import Table

    memory = f"{report.memory_gib} GiB" if report.memory_gib is not None else UNKNOWN
    offload = {True: "yes", False: "no", None: "-"}[report.llama_cpp_gpu_offload]
    module = report.module
    if report.part_number.startswith("p"):  # a part number, not "unknown" / "not a Jetson"
        module += f" ({report.part_number})"
    platform_table = Table(title="Platform", show_header=False, title_justify="left")
    platform_table.add_column(style="bold")
    platform_table.add_column()
    for key, value in [
        ("System", f"{report.system}, Python {report.python}"),
        ("Jetson module", module),
        ("Device model", report.device_model),
        ("L4T / JetPack", f"{report.l4t} / {report.jetpack}" if report.jetson else NOT_JETSON),
        ("Memory", memory),
        ("GPU", report.gpu),
        ("CUDA", report.cuda),
        ("TensorRT", report.tensorrt),
        ("TensorRT-LLM", report.tensorrt_llm),
        ("ONNX Runtime", report.onnxruntime),
        ("ORT providers", ", ".join(report.onnxruntime_providers) or "-"),
        ("llama-cpp-python", f"{report.llama_cpp} (GPU offload: {offload})"),
        ("NVML", report.nvml),
    ]:
        platform_table.add_row(key, escape(value))
    console.print(platform_table)

    backend_table = Table(title="Backends", title_justify="left")
    backend_table.add_column("backend", style="bold")
    backend_table.add_column("for")
    backend_table.add_column("usable")
    backend_table.add_column("why")
    for b in report.backends:
        mark = "[green]yes[/green]" if b.usable else "[red]no[/red]"
        backend_table.add_row(b.name, b.kind, mark, escape(b.reason))
    console.print(backend_table)

    target = TARGETS[report.recommended_target]
    console.print(f"Recommended target: [bold]{target.name}[/bold] ({target.description})")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    if not report.any_llm_backend_usable:
        console.print("[red]No LLM backend is usable here.[/red] " + escape(f"Install one: {RUNTIME_HINT}"))


def main() -> int:
    """`python -m vishwamai_edge.doctor [--json]` until the CLI is wired: same output."""
    report = collect()
    if "--json" in sys.argv[1:]:
        print(json.dumps(to_json(report), indent=2))
    else:
        from rich.console import Console

        render(report, Console())
    return 0 if report.any_llm_backend_usable else 1


if __name__ == "__main__":
    raise SystemExit(main())
