"""A test that needs a tool the README's install command sets up (Chromium, shellcheck, hadolint,
the console script) fails when the tool is missing, with a message naming the install step: a
skip would let a broken setup pass as green. Only hardware this machine lacks may skip."""

from __future__ import annotations

import pytest

INSTALL_TOOLS = "bash .ci/install-test-tools (the README's install command runs it)"


def missing(message: str) -> None:
    pytest.fail(f"{message}; install it with: {INSTALL_TOOLS}", pytrace=False)
