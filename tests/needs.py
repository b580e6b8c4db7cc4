"""A test that needs a tool the CI installs: skipped on a developer's machine without it,
failed under CI (CI=true), where its absence means the CI setup is broken."""

from __future__ import annotations

import os

import pytest


def missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
