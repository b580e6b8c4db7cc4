from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from profile_fixtures import make_fake_bundle  # noqa: E402


@pytest.fixture
def fake_bundle(tmp_path) -> Path:
    return make_fake_bundle(tmp_path)
