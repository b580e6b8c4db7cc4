"""A test that needs a tool the README's install command sets up (Chromium, shellcheck, hadolint,
the console script) fails when the tool is missing, with a message naming the install step: a
skip would let a broken setup pass as green. Only hardware this machine lacks may skip."""

from __future__ import annotations

import pytest

INSTALL_TOOLS = "bash .ci/install-test-tools (the README's install command runs it)"


def missing(message: str) -> None:
    pytest.fail(f"{message}; install it with: {INSTALL_TOOLS}", pytrace=False)


def published_template(name: str) -> str:
    """A model's own chat template as published, from the llama.cpp that llama-cpp-python vendors (its sdist,
    which .ci/install-llama-tools unpacks): models/templates/<name>.jinja."""
    import importlib.metadata
    import os
    from pathlib import Path

    version = importlib.metadata.version("llama-cpp-python")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = (cache / "vishwamai-edge" / f"llama.cpp-{version}" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
            / "models" / "templates" / f"{name}.jinja")
    if not path.is_file():
        missing(f"the llama.cpp sources of llama-cpp-python {version} are not unpacked ({path})")
    return path.read_text(encoding="utf-8")
