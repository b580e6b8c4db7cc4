"""Building a recipe through the real CLI (a subprocess), as a user does, for the model-family tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    # stdin closed: a build must never wait for an answer (transformers asks before running a model's own code)
    return subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def build_recipe(recipe: Path, src: Path, out: Path, *overrides: str, quant: str | None = None,
                 target: str = "laptop-cpu", expect: int = 0) -> subprocess.CompletedProcess:
    """`build --recipe` with the source folder `src` and `--set` overrides; asserts the exit code."""
    args = ["build", "--recipe", str(recipe), "--target", target, "--out", str(out), "--threads", "2",
            "--set", f"source.path={src}"]
    for item in overrides:
        args += ["--set", item]
    if quant:
        args += ["--quant", quant]
    proc = cli(*args)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def bundle_of(out: Path) -> Path:
    """The one bundle a build wrote under `out`."""
    bundles = [p.parent for p in out.glob("*/*/manifest.json")]
    assert len(bundles) == 1, bundles
    return bundles[0]
