"""The import contracts in pyproject.toml (`[tool.importlinter]`): the device side never imports
torch, transformers or the workstation's code (lazily or not), no import cycles, layers from the CLI
down to the core. Checked on this tree, and shown to fail on a copy with one import planted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # this tree's package before the installed one
    return subprocess.run([*LINT, "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=300)


def test_the_contracts_hold():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


@pytest.fixture
def copy(tmp_path) -> Path:
    shutil.copytree(ROOT / "vishwamai_edge", tmp_path / "vishwamai_edge",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_a_lazy_torch_import_in_the_runtime_breaks_them(copy):
    path = copy / "vishwamai_edge/runtime/chat_template.py"
    path.write_text(path.read_text() + "\n\ndef _planted():\n    import torch\n\n    return torch\n")
    proc = lint(copy)
    assert proc.returncode == 1
    assert "vishwamai_edge.runtime is not allowed to import torch" in proc.stdout


def test_a_cycle_breaks_them(copy):
    path = copy / "vishwamai_edge/fsutil.py"  # the core reaching up into the build
    path.write_text(path.read_text() + "\n\ndef _planted():\n    from .build import build\n\n    return build\n")
    proc = lint(copy)
    assert proc.returncode == 1
    assert "No cycles are allowed in vishwamai_edge" in proc.stdout


def test_every_module_imports():
    """What the contracts cannot see: a relative import that names no module (the graph drops it)."""
    code = ("import importlib, pkgutil, vishwamai_edge\n"
            "for m in pkgutil.walk_packages(vishwamai_edge.__path__, 'vishwamai_edge.'):\n"
            "    importlib.import_module(m.name)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
