"""Platform detection: recorded Jetson filesystem trees, fake x86 GPU hosts, and this machine."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vishwamai_edge import doctor, jetson
from vishwamai_edge.targets import TARGETS

JETSON_DATA = Path(__file__).parent / "data" / "jetson"


# (fixture folder, module, part number, L4T, JetPack, target, device-tree model)
RECORDED = [
    ("agx-orin-64-jp6.2", "Jetson AGX Orin 64GB", "p3701-0005", "36.4.3", "6.2", "orin-agx-64",
     "NVIDIA Jetson AGX Orin Developer Kit"),
    ("agx-orin-32-jp5.1.2", "Jetson AGX Orin 32GB (developer kit module)", "p3701-0000", "35.4.1", "5.1.2",
     "orin-agx-32", "NVIDIA Jetson AGX Orin Developer Kit"),
    ("orin-nx-16-jp6.1", "Jetson Orin NX 16GB", "p3767-0000", "36.4.0", "6.1", "orin-nx-16",
     "NVIDIA Jetson Orin NX Engineering Reference Developer Kit"),
    ("orin-nano-8-super-jp6.2", "Jetson Orin Nano 8GB (developer kit module)", "p3767-0005", "36.4.3", "6.2",
     "orin-nano-8", "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"),
]


@pytest.mark.parametrize(
    "folder,module,part,l4t,jetpack,target,model", RECORDED, ids=[r[0] for r in RECORDED]
)
def test_recorded_jetson_trees(folder, module, part, l4t, jetpack, target, model):
    report = doctor.collect(JETSON_DATA / folder)
    assert report.jetson is True
    assert report.device_model == model  # the trailing NUL is stripped
    assert report.module == module
    assert report.part_number == part
    assert report.l4t == l4t
    assert report.jetpack == jetpack
    assert report.recommended_target == target
    assert report.gpu == "integrated (tegra234, sm_87)"
    assert report.memory_gib is None  # no /proc/meminfo recorded: unknown, not an error


def test_super_flash_gets_a_power_mode_note():
    report = doctor.collect(JETSON_DATA / "orin-nano-8-super-jp6.2")
    assert any("MAXN_SUPER" in note for note in report.notes)
    report = doctor.collect(JETSON_DATA / "orin-nx-16-jp6.1")
    assert not any("MAXN_SUPER" in note for note in report.notes)


@pytest.mark.parametrize(
    "line,l4t,jetpack",
    [
        ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64", "36.4.3", "6.2"),
        ("# R36 (release), REVISION: 4.4, GCID: 41062509, BOARD: generic, EABI: aarch64", "36.4.4", "6.2.1"),
        ("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64", "36.3.0", "6.0"),
        ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64", "35.4.1", "5.1.2"),
        ("# R35 (release), REVISION: 1.0, GCID: 31346300, BOARD: t186ref, EABI: aarch64", "35.1.0", "5.0.2"),
        ("# R35 (release), REVISION: 6.0, GCID: 00000000, BOARD: t186ref", "35.6.0", "5.1.4"),
        # A release newer than the table: the JetPack line, never a guessed minor.
        ("# R36 (release), REVISION: 9.9, GCID: 1", "36.9.9", "6.x"),
        ("# R35 (release), REVISION: 9, GCID: 1", "35.9.0", "5.x"),
        ("# R99 (release), REVISION: 1.0", "99.1.0", "unknown"),
        ("garbage", "unknown", "unknown"),
    ],
)
def test_l4t_release_and_jetpack(line, l4t, jetpack):
    assert jetson.parse_l4t_release(line) == l4t
    if l4t != "unknown":
        assert jetson.jetpack_for_l4t(l4t) == jetpack


@pytest.mark.parametrize(
    "compatible,part,target",
    [
        ("nvidia,p3737-0000+p3701-0004\0nvidia,p3701-0004\0nvidia,tegra234\0", "p3701-0004", "orin-agx-32"),
        ("nvidia,p3737-0000+p3701-0008\0nvidia,p3701-0008\0nvidia,tegra234\0", "p3701-0008", "orin-agx-64"),
        ("nvidia,p3768-0000+p3767-0001\0nvidia,p3767-0001\0nvidia,tegra234\0", "p3767-0001", "orin-nano-8"),
        ("nvidia,p3509-0000+p3767-0003\0nvidia,p3767-0003\0nvidia,tegra234\0", "p3767-0003", "orin-nano-8"),
        ("nvidia,p3768-0000+p3767-0004-super\0nvidia,p3767-0004\0nvidia,tegra234\0", "p3767-0004",
         "orin-nano-8"),
    ],
)
def test_sku_decides_the_module(tmp_path, compatible, part, target):
    dt = tmp_path / "proc/device-tree"
    dt.mkdir(parents=True)
    (dt / "compatible").write_bytes(compatible.encode())
    (dt / "model").write_bytes(b"NVIDIA Jetson Orin NX Engineering Reference Developer Kit\0")
    report = doctor.collect(tmp_path)
    assert report.part_number == part
    assert report.recommended_target == target
    assert report.l4t == "unknown"  # a Jetson without /etc/nv_tegra_release
    assert report.jetpack == "unknown"


def test_every_module_maps_to_a_real_target():
    for part, module in jetson.JETSON_MODULES.items():
        assert module.target in TARGETS, part
        assert TARGETS[module.target].jetson
        # A module never gets a profile that assumes more memory than it has.
        assert TARGETS[module.target].memory_gb >= module.memory_gb or module.note


@pytest.mark.parametrize(
    "model,mem_kb,target",
    [
        ("NVIDIA Jetson AGX Orin Developer Kit", 64_384_000, "orin-agx-64"),  # about 61.4 GiB
        ("NVIDIA Jetson AGX Orin Developer Kit", 31_700_000, "orin-agx-32"),
        # 15655.6 MiB, as a 16 GB Orin NX reports it
        ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 16_031_334, "orin-nx-16"),
        ("NVIDIA Jetson Orin Nano Developer Kit", 7_800_000, "orin-nano-8"),
    ],
)
def test_without_compatible_the_size_comes_from_memory(tmp_path, model, mem_kb, target):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(model.encode() + b"\0")
    (tmp_path / "proc/meminfo").write_text(f"MemTotal:       {mem_kb} kB\nMemFree:         1000 kB\n")
    report = doctor.collect(tmp_path)
    assert report.jetson
    assert report.recommended_target == target
    assert report.memory_gib == round(mem_kb / 1024**2, 1)
    assert any("inferred from total memory" in n for n in report.notes)


def _container_tree(tmp_path: Path, fixture: str, mem_kb: int) -> Path:
    """A container's view of a Jetson: the release file and /proc/meminfo, no device tree."""
    (tmp_path / "etc").mkdir()
    release = (JETSON_DATA / fixture / "etc/nv_tegra_release").read_bytes()
    (tmp_path / "etc/nv_tegra_release").write_bytes(release)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text(f"MemTotal:       {mem_kb} kB\n")
    return tmp_path


def test_in_a_container_without_device_tree_the_class_comes_from_memory(tmp_path):
    root = _container_tree(tmp_path, "agx-orin-64-jp6.2", 64_384_000)
    report = doctor.collect(root)
    assert report.jetson
    assert report.l4t == "36.4.3" and report.jetpack == "6.2"
    assert report.device_model == "unknown"
    assert report.module == "Jetson Orin, 64 GB class"
    assert report.recommended_target == "orin-agx-64"
    assert report.gpu == "integrated (tegra234, sm_87)"
    assert any("device tree not visible" in n for n in report.notes)


def test_jetpack5_container_without_device_tree_is_not_guessed(tmp_path):
    # L4T R35 also runs Jetson Xavier (sm_72): memory alone cannot say it is an Orin.
    root = _container_tree(tmp_path, "agx-orin-32-jp5.1.2", 31_700_000)
    report = doctor.collect(root)
    assert report.jetson and report.jetpack == "5.1.2"
    assert report.module == "unknown"
    assert report.recommended_target == "laptop-cpu"


def test_device_tree_mounted_by_run_sh_is_read(tmp_path):
    root = _container_tree(tmp_path, "orin-nx-16-jp6.1", 16_031_334)
    mounted = root / "run/vishwamai-edge/device-tree"
    mounted.mkdir(parents=True)
    recorded = JETSON_DATA / "orin-nx-16-jp6.1/proc/device-tree"
    for name in ("model", "compatible"):
        (mounted / name).write_bytes((recorded / name).read_bytes())
    report = doctor.collect(root)
    assert report.module == "Jetson Orin NX 16GB"
    assert report.part_number == "p3767-0000"
    assert report.recommended_target == "orin-nx-16"
    assert not any("device tree not visible" in n for n in report.notes)


def test_unreadable_files_are_unknown_not_errors(tmp_path):
    # A directory where a file should be: reading it raises IsADirectoryError (an OSError),
    # which works as a stand-in for a permission error even when the tests run as root.
    (tmp_path / "proc/device-tree/model").mkdir(parents=True)
    (tmp_path / "proc/device-tree/compatible").write_bytes(b"nvidia,p3768-0000+p3767-0000\0nvidia,tegra234\0")
    (tmp_path / "etc/nv_tegra_release").mkdir(parents=True)
    (tmp_path / "proc/meminfo").mkdir()
    (tmp_path / "usr/local/cuda/version.json").mkdir(parents=True)
    report = doctor.collect(tmp_path)
    assert report.jetson
    assert report.device_model == "unknown"
    assert report.l4t == "unknown"
    assert report.jetpack == "unknown"
    assert report.memory_gib is None
    assert report.cuda == "unknown"
    assert report.recommended_target == "orin-nx-16"  # the SKU was readable


def test_cuda_version_from_the_toolkit_tree(tmp_path):
    cuda = tmp_path / "usr/local/cuda"
    cuda.mkdir(parents=True)
    (cuda / "version.json").write_text(json.dumps({"cuda": {"name": "CUDA SDK", "version": "12.6.68"}}))
    assert doctor.collect(tmp_path).cuda == "12.6.68"


@pytest.mark.parametrize(
    "banner,driver",
    [
        ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.129.03  Thu Oct 19 18:56:32 UTC 2023",
         "535.129.03"),
        ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.07  Release Build  "
         "(dvs-builder@U16-I3-B03-4-3)  Fri Mar 14 13:12:07 UTC 2025", "570.133.07"),
    ],
)
def test_x86_with_an_nvidia_gpu_recommends_x86_cuda(tmp_path, banner, driver):
    gpu = tmp_path / "proc/driver/nvidia/gpus/0000:01:00.0"
    gpu.mkdir(parents=True)
    (gpu / "information").write_text(
        "Model: \t\t NVIDIA GeForce RTX 3090\nIRQ:   \t\t 139\nBus Type: \t PCIe\n"
    )
    (tmp_path / "proc/driver/nvidia/version").write_text(f"{banner}\nGCC version:  gcc version 12.2.0\n")
    report = doctor.collect(tmp_path)
    assert not report.jetson
    assert report.module == "not a Jetson"
    assert report.recommended_target == "x86-cuda"
    assert report.gpu == f"NVIDIA GeForce RTX 3090 (driver {driver})"


def test_empty_tree_is_a_cpu_machine(tmp_path):
    report = doctor.collect(tmp_path)
    assert not report.jetson
    assert report.l4t == "not a Jetson"
    assert report.gpu == "none found"
    assert report.cuda == "not installed"
    assert report.recommended_target == "laptop-cpu"


def _llama_cpp_imports() -> bool:
    try:
        importlib.import_module("llama_cpp")
    except Exception:
        return False
    return True


def test_this_machine():
    host_has_gpu = Path("/proc/driver/nvidia/gpus").is_dir() or Path("/etc/nv_tegra_release").exists()
    if host_has_gpu:
        pytest.skip("this machine has an NVIDIA GPU or is a Jetson; the test expects a CPU-only host")
    report = doctor.collect()
    assert report.recommended_target == "laptop-cpu"
    assert not report.jetson
    llamacpp = report.backend("llamacpp")
    assert llamacpp.usable is _llama_cpp_imports(), llamacpp.reason
    assert llamacpp.usable, llamacpp.reason  # the dev install has llama.cpp: the health check must pass
    assert report.any_llm_backend_usable is True and doctor.any_llm_backend(report) is True
    if llamacpp.usable:
        assert report.llama_cpp not in ("not installed", "unknown")
        assert report.llama_cpp_gpu_offload is False  # no GPU here
    else:
        assert "vishwamai-edge[runtime]" in llamacpp.reason or "fails to import" in llamacpp.reason
    # No GPU: TensorRT-LLM cannot be usable even if installed.
    assert report.backend("trtllm").usable is False


def test_json_round_trips_and_render_names_the_target(tmp_path):
    from rich.console import Console

    report = doctor.collect(JETSON_DATA / "agx-orin-64-jp6.2")
    data = json.loads(json.dumps(doctor.to_json(report)))
    assert data["module"] == "Jetson AGX Orin 64GB"
    assert data["jetpack"] == "6.2"
    assert data["recommended_target"] == "orin-agx-64"
    assert {b["name"] for b in data["backends"]} == {"llamacpp", "trtllm", "onnxruntime"}
    assert data["any_llm_backend_usable"] == report.any_llm_backend_usable

    console = Console(record=True, width=200)
    doctor.render(report, console)
    text = console.export_text()
    assert "Jetson AGX Orin 64GB (p3701-0005)" in text
    assert "36.4.3 / 6.2" in text
    assert "Recommended target: orin-agx-64" in text
    for name in ("llamacpp", "trtllm", "onnxruntime"):
        assert name in text


def test_import_is_light():
    """The health check imports doctor in every container: no heavy stacks at import time."""
    heavy = ["torch", "transformers", "onnxruntime", "llama_cpp", "tensorrt", "numpy", "rich"]
    code = (
        "import sys, vishwamai_edge.doctor; "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_only_a_backend_the_runtime_has_counts_for_the_health_check(monkeypatch):
    import dataclasses

    from vishwamai_edge.runtime import backends

    report = doctor.collect()
    fake = [doctor.BackendStatus(b.name, b.kind, b.name == "trtllm", b.reason) for b in report.backends]
    only_trtllm = dataclasses.replace(report, backends=fake)  # llama.cpp broken, a TensorRT-LLM "found"
    assert only_trtllm.backend("trtllm").usable and not only_trtllm.backend("llamacpp").usable
    assert doctor.any_llm_backend(only_trtllm) is True  # the runtime has a TensorRT-LLM backend
    monkeypatch.setattr(backends, "BACKENDS", {"llamacpp": backends.BACKENDS["llamacpp"]})
    assert doctor.any_llm_backend(only_trtllm) is False  # a toolkit the runtime cannot drive runs no bundle
    assert "no TensorRT-LLM runtime backend" in doctor.collect().backend("trtllm").reason
