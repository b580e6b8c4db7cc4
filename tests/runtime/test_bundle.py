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


def _rewrite(bundle_dir, **changes):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest.update(changes)
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_llm_file_must_be_listed(bundle_dir, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "x.gguf"
    shutil.copy(bundle_dir / "llm" / "model.gguf", outside)
    for file in (str(outside), "../x.gguf", "llm/other.gguf"):
        _rewrite(bundle_dir, files={}, llm={"backend": "llamacpp", "file": file})
        with pytest.raises(BundleError, match="not listed|not a path relative|outside"):
            Bundle.load(bundle_dir)


def test_listed_files_must_stay_inside(bundle_dir, tmp_path_factory):
    outside_dir = tmp_path_factory.mktemp("outside")
    shutil.copy(bundle_dir / "llm" / "model.gguf", outside_dir / "x.gguf")
    entry = json.loads((bundle_dir / "manifest.json").read_text())["files"]["llm/model.gguf"]
    # a listed, correctly hashed file reached through ../ or an absolute path
    for rel in ("../" + outside_dir.name + "/x.gguf", str(outside_dir / "x.gguf")):
        _rewrite(bundle_dir, files={rel: entry}, llm={"backend": "llamacpp", "file": rel})
        with pytest.raises(BundleError, match="outside|not a path relative"):
            Bundle.load(bundle_dir)


def test_symlink_out_of_the_bundle_is_refused(bundle_dir, tmp_path_factory):
    outside = tmp_path_factory.mktemp("target") / "model.gguf"
    shutil.move(bundle_dir / "llm" / "model.gguf", outside)
    (bundle_dir / "llm" / "model.gguf").symlink_to(outside)  # same bytes, same hash: only the place is wrong
    with pytest.raises(BundleError, match="points outside the bundle"):
        Bundle.load(bundle_dir)
    # a symlink that stays inside the bundle is fine
    (bundle_dir / "llm" / "model.gguf").unlink()
    shutil.move(outside, bundle_dir / "real.gguf")
    (bundle_dir / "llm" / "model.gguf").symlink_to(bundle_dir / "real.gguf")
    assert Bundle.load(bundle_dir).llm_path() == bundle_dir / "llm" / "model.gguf"


@pytest.mark.parametrize("change, fragment", [
    ({"files": ["llm/model.gguf"]}, "files: input should be a valid dictionary"),
    ({"files": {"llm/model.gguf": {"sha256": "0" * 64}}}, "files.llm/model.gguf.size: field required"),
    ({"files": {"llm/model.gguf": {"size": "big", "sha256": "0" * 64}}}, "files.llm/model.gguf.size"),
    ({"llm": "llm/model.gguf"}, "llm: input should be a valid dictionary"),
    ({"llm": {"backend": "llamacpp"}}, "llm.file: field required"),
])
def test_manifest_of_the_wrong_shape_is_one_line(bundle_dir, change, fragment):
    _rewrite(bundle_dir, **change)
    with pytest.raises(BundleError) as info:
        Bundle.load(bundle_dir)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_manifest_that_is_a_list(bundle_dir):
    (bundle_dir / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="not a vishwamai-edge manifest"):
        Bundle.load(bundle_dir)


def test_bare_gguf_opens_only_itself(tmp_path):
    good = tmp_path / "m.gguf"
    good.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(BundleError, match="bare GGUF"):
        Bundle.load(good).file("encoders/vision.onnx")
