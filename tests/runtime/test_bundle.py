"""Bundles: the manifest is checked file by file before anything loads."""

from __future__ import annotations

import json
import shutil

import pytest

from vishwamai_edge.errors import BundleError
from vishwamai_edge.runtime.bundle import Bundle, write_manifest


@pytest.fixture
def bundle_dir(tmp_path):
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "model.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 10)
    write_manifest(tmp_path, {"name": "t", "llm": {"backend": "llamacpp", "file": "llm/model.gguf"}},
                   ["llm/model.gguf"])
    return tmp_path


def test_valid_bundle_loads(bundle_dir):
    b = Bundle.load(bundle_dir)
    assert b.name == "t" and b.llm_path() == bundle_dir / "llm" / "model.gguf"


def test_changed_byte_refused(bundle_dir):
    f = bundle_dir / "llm" / "model.gguf"
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        Bundle.load(bundle_dir)


def test_truncated_file_refused(bundle_dir):
    f = bundle_dir / "llm" / "model.gguf"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(BundleError, match="truncated or replaced"):
        Bundle.load(bundle_dir)


def test_missing_file_and_manifest(bundle_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("copy")
    shutil.copytree(bundle_dir, other, dirs_exist_ok=True)
    (other / "llm" / "model.gguf").unlink()
    with pytest.raises(BundleError, match="is missing"):
        Bundle.load(other)
    (other / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.load(other)


def test_corrupt_manifest(bundle_dir):
    (bundle_dir / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(bundle_dir)
    (bundle_dir / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(BundleError, match="schema"):
        Bundle.load(bundle_dir)


def test_bare_gguf_and_non_gguf(tmp_path):
    good = tmp_path / "m.gguf"
    good.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert Bundle.load(good).llm_path() == good
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 zip")
    with pytest.raises(BundleError, match="not a GGUF file"):
        Bundle.load(bad)
