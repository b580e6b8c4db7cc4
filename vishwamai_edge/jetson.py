"""Jetson facts: which Orin module a device tree names, the JetPack of an L4T release, and the target profile
(targets.py) each module runs. Read by `doctor` (and through it by `profile`); no I/O here."""

from __future__ import annotations

import re
from dataclasses import dataclass

UNKNOWN = "unknown"


@dataclass(frozen=True)
class JetsonModule:
    name: str
    memory_gb: int
    target: str  # a key of targets.TARGETS
    note: str = ""


# Module part numbers (board id 3701 = AGX Orin, 3767 = Orin NX / Orin Nano) and SKUs, as in
# NVIDIA's Jetson Linux developer guide and the USB recovery-mode id table. The SKU sits in
# /proc/device-tree/compatible ("nvidia,p3737-0000+p3701-0005", "nvidia,p3701-0005", ...);
# the model string names the carrier board, not the memory size, so the SKU decides.
JETSON_MODULES: dict[str, JetsonModule] = {
    "p3701-0000": JetsonModule("Jetson AGX Orin 32GB (developer kit module)", 32, "orin-agx-32"),
    "p3701-0004": JetsonModule("Jetson AGX Orin 32GB", 32, "orin-agx-32"),
    "p3701-0005": JetsonModule("Jetson AGX Orin 64GB", 64, "orin-agx-64"),
    "p3701-0008": JetsonModule("Jetson AGX Orin Industrial 64GB", 64, "orin-agx-64"),
    "p3767-0000": JetsonModule("Jetson Orin NX 16GB", 16, "orin-nx-16"),
    "p3767-0001": JetsonModule(
        "Jetson Orin NX 8GB", 8, "orin-nano-8",
        note="no Orin NX 8GB profile: orin-nano-8 has the same 8 GB memory budget",
    ),
    "p3767-0003": JetsonModule("Jetson Orin Nano 8GB", 8, "orin-nano-8"),
    "p3767-0004": JetsonModule(
        "Jetson Orin Nano 4GB", 4, "orin-nano-8",
        note="no 4 GB profile: orin-nano-8 assumes 8 GB, so only the smallest models fit",
    ),
    "p3767-0005": JetsonModule("Jetson Orin Nano 8GB (developer kit module)", 8, "orin-nano-8"),
}

_MODULE_PART = re.compile(r"p(3701|3767)-(\d{4})")

# L4T (Jetson Linux) release -> JetPack, from NVIDIA's JetPack archive as tabulated by
# jetson-containers' l4t_version.py and jetson-stats. Only exact releases; anything else
# gets the major line ("6.x"), because a guessed minor would be wrong about a real board
# (L4T 35.1 was JetPack 5.0.2, 35.2.1 was 5.1).
L4T_TO_JETPACK: dict[str, str] = {
    "34.1.0": "5.0 DP",
    "34.1.1": "5.0.1 DP",
    "35.1.0": "5.0.2",
    "35.2.1": "5.1",
    "35.3.1": "5.1.1",
    "35.4.1": "5.1.2",
    "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "35.6.1": "5.1.5",
    "35.6.2": "5.1.5",
    "36.2.0": "6.0 DP",
    "36.3.0": "6.0",
    "36.4.0": "6.1",
    "36.4.2": "6.1 (rev. 1)",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
    "36.4.7": "6.2.1",
}
_JETPACK_MAJOR = {"32": "4.x", "34": "5.x", "35": "5.x", "36": "6.x", "38": "7.x", "39": "7.x"}

_L4T_LINE = re.compile(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")


def parse_l4t_release(text: str) -> str:
    """`# R36 (release), REVISION: 4.3, GCID: ...` -> "36.4.3"; UNKNOWN if it does not parse."""
    m = _L4T_LINE.search(text)
    if not m:
        return UNKNOWN
    parts = [m.group(1), *m.group(2).split(".")]
    while len(parts) < 3:  # "REVISION: 4" is release 36.4.0 in NVIDIA's numbering
        parts.append("0")
    return ".".join(parts[:3])


def jetpack_for_l4t(l4t: str) -> str:
    if l4t in L4T_TO_JETPACK:
        return L4T_TO_JETPACK[l4t]
    major = l4t.split(".")[0]
    return _JETPACK_MAJOR.get(major, UNKNOWN)


def module_for_compatible(compatible: str) -> str | None:
    """The module part number ("p3701-0005") in a device-tree compatible list, if any."""
    for entry in compatible.split("\0"):
        m = _MODULE_PART.search(entry)
        if m:
            return f"p{m.group(1)}-{m.group(2)}"
    return None


def module_for_model(model: str, memory_gib: float | None) -> JetsonModule | None:
    """Fallback when compatible is missing: the family from the model string, the size from RAM.

    /proc/meminfo shows less than the nominal size (a 64 GB AGX reports about 61 GiB, a 16 GB
    NX about 15.3 GiB), hence thresholds between sizes rather than equality.
    """
    lowered = model.lower()
    if "orin" not in lowered or memory_gib is None:
        return None
    if "agx" in lowered:
        return JETSON_MODULES["p3701-0005" if memory_gib > 40 else "p3701-0004"]
    if "orin nx" in lowered:
        return JETSON_MODULES["p3767-0000" if memory_gib > 10 else "p3767-0001"]
    if "orin nano" in lowered:
        return JETSON_MODULES["p3767-0003" if memory_gib > 5 else "p3767-0004"]
    return None


def module_for_memory(memory_gib: float | None) -> JetsonModule | None:
    """Last resort on an Orin whose device tree is hidden: the module class from RAM alone."""
    if memory_gib is None:
        return None
    classes = ((40, "p3701-0005"), (20, "p3701-0004"), (10, "p3767-0000"), (5, "p3767-0003"))
    part = next((p for threshold, p in classes if memory_gib > threshold), "p3767-0004")
    known = JETSON_MODULES[part]
    return JetsonModule(f"Jetson Orin, {known.memory_gb} GB class", known.memory_gb, known.target, known.note)


# Where the device tree is read: the kernel's own view, then the copy jetson/run.sh mounts into
# the container (Docker masks /sys/firmware, which /proc/device-tree links to).
