"""The typed manifest: a bundle built before schema 2 loads through the migration and answers as the new one
does; any other schema is refused in one line; the build writes every section through the same models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vishwamai_edge.errors import BundleError
from vishwamai_edge.runtime.bundle import Bundle
from vishwamai_edge.runtime.manifest import SCHEMA_VERSION, Manifest, migrate
from vishwamai_edge.runtime.options import RuntimeOptions
from vishwamai_edge.runtime.pipeline import Pipeline
from vishwamai_edge.targets import TARGETS

pytestmark = pytest.mark.e2e
# manifest.json of recipes/smollm2-135m.yaml's laptop-cpu bundle as vishwamai-edge wrote it at schema 1
SCHEMA1 = Path(__file__).parents[1] / "data" / "schema1" / "smollm2-135m-laptop-cpu.json"


def as_schema1(bundle: Path, out: Path) -> Path:
    """The bundle's files under the schema-1 manifest (its `files` section taken from the bundle's own, which
    lists the same paths and, since the default recipe carries an embedding model, that model's files too)."""
    shutil.copytree(bundle, out, copy_function=shutil.copy)
    old = json.loads(SCHEMA1.read_text())
    new = json.loads((bundle / "manifest.json").read_text())
    assert set(old["files"]) <= set(new["files"])
    (out / "manifest.json").write_text(json.dumps({**old, "files": {k: new["files"][k] for k in old["files"]}}))
    return out


def answer(path: Path) -> str:
    pipeline = Pipeline.load(path, RuntimeOptions(n_threads=1, n_ctx=512))
    try:
        return "".join(pipeline.session(max_tokens=12).ask("What is the capital of France?"))
    finally:
        pipeline.close()


def test_the_build_writes_schema_2_with_the_targets_defaults(embedded_bundle):
    data = json.loads((embedded_bundle / "manifest.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 2
    laptop = TARGETS["laptop-cpu"]
    assert (data["runtime"]["parallel"], data["runtime"]["draft_max"]) == (laptop.parallel, laptop.draft_max)
    assert data["llm"]["prompt"] == "token"
    assert Manifest.model_validate(data).dump() == data  # written by the model it is read with


def test_a_schema_1_bundle_loads_and_answers_as_the_new_one(embedded_bundle, tmp_path):
    old = as_schema1(embedded_bundle, tmp_path / "old")
    bundle = Bundle.load(old)
    assert json.loads((old / "manifest.json").read_text())["schema_version"] == 1  # the file is not rewritten
    assert bundle.manifest.schema_version == 2
    assert bundle.runtime_defaults.parallel == TARGETS["laptop-cpu"].parallel
    assert bundle.runtime_defaults.draft_max == TARGETS["laptop-cpu"].draft_max
    assert answer(old) == answer(embedded_bundle)


@pytest.mark.parametrize("version, says", [(3, "newer than this vishwamai-edge reads"), (0, "rebuild the bundle"),
                                           ("1", "rebuild the bundle")])
def test_other_schemas_are_refused_in_one_line(embedded_bundle, tmp_path, version, says):
    bundle = as_schema1(embedded_bundle, tmp_path / "b")
    data = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**data, "schema_version": version}))
    with pytest.raises(BundleError, match=says):
        Bundle.load(bundle)
    proc = subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", "chat", str(bundle), "-p", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and says in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_a_section_of_the_wrong_shape_is_one_line(embedded_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(embedded_bundle, bundle, copy_function=shutil.copy)
    data = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**data, "runtime": {**data["runtime"], "kv_type": "f8"}}))
    with pytest.raises(BundleError, match=r"runtime\.kv_type: input should be"):
        Bundle.load(bundle)


# Schema-1 sections as each family's build wrote them, and what the migration names in them
LLAVA_1 = {"llm": {"file": "llm/m.gguf", "image_token": {"text": "<image>", "id": 32000}},
           "encoders": {"image": {"file": "encoders/vision-fp16.onnx", "n_tokens": 576, "hidden": 4096}}}
VILA_1 = {"llm": {"file": "llm/m.gguf", "image_token": {"text": "<image>", "id": None}},
          "encoders": {"image": {"file": "encoders/vision-fp16.onnx", "n_tokens": 196, "hidden": 2560}}}
MINICPMV_1 = {"llm": {"file": "llm/m.gguf", "image_token": {"text": "(<image>./</image>)", "id": None}},
              "encoders": {"image": {"kind": "minicpmv", "file": "encoders/vision-minicpmv-fp32.onnx"}}}
SPEECH_1 = {"llm": {"file": "llm/m.gguf"}, "encoders": {"audio": {"kind": "speech-to-text", "folder": "encoders/w"}}}
HEARS_1 = {"llm": {"file": "llm/m.gguf", "audio_token": {"text": "<audio>", "id": 50}},
           "encoders": {"audio": {"mode": "embeddings", "file": "encoders/audio.onnx", "n_tokens": 150}}}


@pytest.mark.parametrize("old, prompt, kinds", [
    (LLAVA_1, "token", {"image": "vision"}),
    (VILA_1, "text", {"image": "vision"}),
    (MINICPMV_1, "sliced", {"image": "minicpmv"}),
    (SPEECH_1, "token", {"audio": "speech-to-text"}),
    (HEARS_1, "token", {"audio": "audio-embeddings"}),
])
def test_the_migration_names_what_schema_1_left_implicit(old, prompt, kinds):
    data = {"schema_version": 1, "name": "b", "target": {"name": "orin-agx-64"}, "runtime": {"n_ctx": 4096}, **old}
    new = Manifest.model_validate(migrate(data))
    assert new.llm.prompt == prompt
    assert {slot: e.kind for slot, e in new.encoders.items()} == kinds
    orin = TARGETS["orin-agx-64"]
    assert (new.runtime.n_ctx, new.runtime.parallel, new.runtime.draft_max) == (4096, orin.parallel, orin.draft_max)
    assert data["schema_version"] == 1 and "prompt" not in data["llm"]  # the input is left as it was
