"""Target profiles: the devices a bundle is built for.

Numbers are the vendors' published figures (NVIDIA Jetson Orin data sheets).
`profile` divides measured decode speed by `memory_bandwidth_gbs` to give the
roofline ratio, so keep these the peak DRAM bandwidths, not measured ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    memory_gb: float  # RAM available to the model (shared CPU/GPU memory on Jetson)
    memory_bandwidth_gbs: float  # peak DRAM bandwidth
    cuda_arch: str | None  # SM version for engines and CUDA builds, e.g. "87"; None for CPU-only
    backends: tuple[str, ...]  # preferred LLM backends, best first
    gguf_quant: str = "q4_k_m"  # quantization of the portable llama.cpp fallback
    jetson: bool = False
    # requests the runtime decodes together (`serve`/`ui --parallel`): more slots raise the total
    # tokens/s of a memory-bound device, each adds a context's KV cache to its memory
    parallel: int = 4
    # draft tokens a speculative step verifies at most: verifying k + 1 rows costs about one decode
    # step on a memory-bound device, but about k + 1 of them on CPU threads (runtime/speculative.py)
    draft_max: int = 8


TARGETS: dict[str, TargetProfile] = {
    t.name: t
    for t in [
        TargetProfile(
            name="laptop-cpu",
            description="Any x86-64 or arm64 laptop or PC, CPU only",
            memory_gb=16,
            memory_bandwidth_gbs=50,
            cuda_arch=None,
            backends=("llamacpp",),
            # one slot: on CPU threads decoding is compute-bound (8 streams gave no more total
            # tokens/s than 1, for llama-server too), and llama.cpp's CPU kernels give batched rows
            # slightly other logits on Q4_K_M; `--parallel N` opts in
            parallel=1,
            # measured on 1 thread, SmolLM2-135M Q4_1: a batch of 4 rows 44 ms, of 8 rows 100 ms, one
            # row 15 ms: 3 drafts (4 rows) is the most that pays, even when every draft is accepted
            draft_max=3,
        ),
        TargetProfile(
            name="x86-cuda",
            description="x86-64 PC with an NVIDIA GPU (Ampere or newer)",
            memory_gb=24,
            memory_bandwidth_gbs=936,  # RTX 3090 class; engines are rebuilt for the actual GPU
            cuda_arch="86",
            backends=("trtllm", "llamacpp"),
            parallel=8,
        ),
        TargetProfile(
            name="orin-agx-64",
            description="Jetson AGX Orin 64GB",
            memory_gb=64,
            memory_bandwidth_gbs=204.8,
            cuda_arch="87",
            backends=("trtllm", "llamacpp"),
            jetson=True,
            parallel=8,
        ),
        TargetProfile(
            name="orin-agx-32",
            description="Jetson AGX Orin 32GB",
            memory_gb=32,
            memory_bandwidth_gbs=204.8,
            cuda_arch="87",
            backends=("trtllm", "llamacpp"),
            jetson=True,
        ),
        TargetProfile(
            name="orin-nx-16",
            description="Jetson Orin NX 16GB",
            memory_gb=16,
            memory_bandwidth_gbs=102.4,
            cuda_arch="87",
            backends=("trtllm", "llamacpp"),
            jetson=True,
        ),
        TargetProfile(
            name="orin-nano-8",
            description="Jetson Orin Nano 8GB (102 GB/s in the JetPack 6.1+ 'super' power mode, 68 before)",
            memory_gb=8,
            memory_bandwidth_gbs=102.0,
            cuda_arch="87",
            backends=("llamacpp", "trtllm"),  # 8 GB shared: llama.cpp's smaller footprint first
            jetson=True,
            parallel=2,  # every slot's KV cache comes out of the 8 GB the model shares
        ),
    ]
}

# Short names people type.
ALIASES = {"orin": "orin-agx-64", "cpu": "laptop-cpu", "cuda": "x86-cuda"}


def get_target(name: str) -> TargetProfile:
    key = ALIASES.get(name, name)
    if key not in TARGETS:
        known = ", ".join(list(TARGETS) + list(ALIASES))
        raise UserError(f"unknown target {name!r}; known targets: {known}")
    return TARGETS[key]
