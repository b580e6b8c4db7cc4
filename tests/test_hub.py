"""Hub sources against a local stand-in of the Hub, and pre-quantized GGUFs bundled as they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_standin import HubStandIn
from rich.console import Console
from test_cli_errors import assert_one_line_error

from vishwamai_edge.build import build
from vishwamai_edge.fsutil import sha256_file
from vishwamai_edge.recipe import load_recipe
from vishwamai_edge.runtime.options import RuntimeOptions
from vishwamai_edge.runtime.pipeline import Pipeline
from vishwamai_edge.sources import embedded as sources
from vishwamai_edge.targets import get_target

REPO = "tiny-org/tiny-llama"
FAST_EXPORT = "export:\n  gguf:\n    outtype: f16\n    quants: []\n    imatrix: false\n"


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_model):
    """The stand-in with the tiny llama as REPO (plus a pickle and a README), and HF_* pointed at it."""
    with HubStandIn() as standin:
        files = {p.name: p for p in tiny_model("llama").iterdir() if p.is_file()}
        files["pytorch_model.bin"] = b"\x80\x02pickle, never downloaded"
        files["README.md"] = b"# tiny\n"
        standin.add_repo(REPO, files)
        env = {"HF_ENDPOINT": standin.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        for key in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        _reload_hub_constants()
        yield standin
    _reload_hub_constants()


def _reload_hub_constants() -> None:
    """huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE once, at import (the module object stays)."""
    import importlib

    from huggingface_hub import constants

    importlib.reload(constants)


def write_recipe(tmp_path: Path, source: str, name: str = "from-hub") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nsource:\n{source}{FAST_EXPORT}")
    return path


def hub_source(repo: str = REPO, extra: str = "") -> str:
    return f"  kind: hub\n  repo: {repo}\n  revision: main\n{extra}"


def build_in_process(recipe: Path, out: Path, quant: str = "f16"):
    return build(load_recipe(recipe), get_target("laptop-cpu"), out, quant=quant, n_threads=2,
                 console=Console(quiet=True))


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def cli_build(recipe: Path, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("build", "--recipe", str(recipe), "--out", str(out), "--quant", "f16", "--threads", "2", env=env)


def test_hub_id_to_bundle_then_no_request(hub, tmp_path):
    recipe = write_recipe(tmp_path, hub_source())
    result = build_in_process(recipe, tmp_path / "build")
    sha = hub.repos[REPO].sha
    src = result.manifest["source"]
    assert src["kind"] == "hub" and src["repo"] == REPO and src["revision"] == "main"
    assert src["revision_sha"] == sha
    check = result.manifest["checks"]["f16"]
    assert check["top1_agreement"] == 1.0 and check["tokenizer_agreement"] == 1.0
    # only what the stages read: no pickle, no README
    fetched = {path.rsplit("/", 1)[-1] for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path}
    assert "pytorch_model.bin" not in fetched and "README.md" not in fetched
    assert {"config.json", "model.safetensors"} <= fetched
    snapshot = Path(os.environ["HF_HOME"]) / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / sha
    assert not (snapshot / "pytorch_model.bin").exists()

    before = len(hub.requests)
    again = build_in_process(recipe, tmp_path / "build")
    assert len(hub.requests) == before, hub.requests[before:]  # the recorded commit, from the cache
    assert "model-f16.gguf" in again.skipped
    assert again.manifest["source"]["revision_sha"] == sha

    # another build folder, offline: the cache alone
    proc = cli_build(recipe, tmp_path / "offline", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert len(hub.requests) == before
    manifest = json.loads((Path(proc.stdout.strip()) / "manifest.json").read_text())
    assert manifest["source"]["revision_sha"] == sha


def test_interrupted_download_resumes(hub, tmp_path, monkeypatch):
    """A connection dropped mid-file once: huggingface_hub asks for the rest (Range) in the same run."""
    from huggingface_hub import constants

    # it writes (and so can resume from) whole 10 MB chunks; the tiny model is smaller than one
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    hub.drop["model.safetensors"] = 1
    result = build_in_process(write_recipe(tmp_path, hub_source()), tmp_path / "build")
    gets = hub.gets("model.safetensors")
    assert len(gets) == 2 and gets[0][2] is None and gets[1][2].startswith("bytes=")
    size = len(hub.repos[REPO].files["model.safetensors"])
    assert 0 < int(gets[1][2][6:-1]) <= size // 2
    assert result.manifest["checks"]["f16"]["top1_agreement"] == 1.0  # the resumed file is whole
    assert result.manifest["source"]["revision_sha"] == hub.repos[REPO].sha


@pytest.mark.slow
def test_interrupted_download_fails_one_line_and_rerun_resumes(hub, tmp_path):
    """More drops than huggingface_hub retries: one line, exit 2; the rerun fetches only what is missing."""
    recipe = write_recipe(tmp_path, hub_source())
    hub.drop_fraction = 0.0  # headers, then nothing: every try fails
    hub.drop["model.safetensors"] = 6
    proc = cli_build(recipe, tmp_path / "build")
    assert_one_line_error(proc, "download of tiny-org/tiny-llama", "interrupted", "rerun the build to resume")
    config_gets = len(hub.gets("config.json"))
    proc = cli_build(recipe, tmp_path / "build")
    assert proc.returncode == 0, proc.stderr
    assert len(hub.gets("config.json")) == config_gets  # finished files are kept
    assert len(hub.gets("model.safetensors")) == 7


def test_gated_repo(hub, tmp_path):
    hub.add_repo("tiny-org/gated", {n: c for n, c in hub.repos[REPO].files.items()}, gated=True)
    recipe = write_recipe(tmp_path, hub_source("tiny-org/gated"))
    proc = cli_build(recipe, tmp_path / "build")
    assert_one_line_error(proc, "tiny-org/gated is gated", "HF_TOKEN")
    proc = cli_build(recipe, tmp_path / "build", env={"HF_TOKEN": "hf_wrong"})
    assert_one_line_error(proc, "HF_TOKEN has no access")
    proc = cli_build(recipe, tmp_path / "build", env={"HF_TOKEN": hub.token})
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "case, source, env, fragments",
    [
        ("missing repo", hub_source("tiny-org/no-such-model"), {}, ["tiny-org/no-such-model does not exist"]),
        ("missing revision", f"  kind: hub\n  repo: {REPO}\n  revision: v9\n", {},
         ["revision 'v9' does not exist", "source.revision"]),
        ("offline, not cached", hub_source(), {"HF_HUB_OFFLINE": "1"}, ["HF_HUB_OFFLINE is set", "not (fully) in"]),
        ("no network", hub_source(), {"HF_ENDPOINT": "http://127.0.0.1:9"},
         ["cannot reach the Hub", "HF_HUB_OFFLINE=1"]),
    ],
)
def test_hub_errors_are_one_line(hub, tmp_path, case, source, env, fragments):
    recipe = write_recipe(tmp_path, source)
    assert_one_line_error(cli_build(recipe, tmp_path / "build", env=env), *fragments)


def test_repo_without_safetensors(hub, tmp_path):
    files = {n: c for n, c in hub.repos[REPO].files.items() if not n.endswith(".safetensors")}
    hub.add_repo("tiny-org/pickles-only", files)
    recipe = write_recipe(tmp_path, hub_source("tiny-org/pickles-only"))
    proc = cli_build(recipe, tmp_path / "build")
    assert_one_line_error(proc, "no *.safetensors weights", "pytorch_model.bin", "allow_pickle")
    assert not hub.gets("pytorch_model.bin")
    hub.add_repo("tiny-org/nothing", {"config.json": files["config.json"]})
    proc = cli_build(write_recipe(tmp_path, hub_source("tiny-org/nothing")), tmp_path / "build")
    assert_one_line_error(proc, "tiny-org/nothing", "no *.safetensors weights")


# -- as is ------------------------------------------------------------------------------------
def assert_as_is_bundle(result, source_gguf: Path) -> None:
    m = result.manifest
    rel = m["llm"]["file"]
    assert sha256_file(result.bundle / rel) == sha256_file(source_gguf)  # the same bytes, not re-encoded
    assert m["files"][rel]["sha256"] == sha256_file(source_gguf)
    assert m["llm"]["quant"] == "q4_1" and m["llm"]["as_is"] is True
    check = m["checks"]["as_is"]
    assert "no torch comparison" in check["note"]
    assert check["header"]["architecture"] == "llama" and check["header"]["tensors"] == 272
    assert check["tensor_counts"] == m["llm"]["tensor_types"] and "Q4_1" in check["tensor_counts"]
    assert sum(check["tensor_counts"].values()) == check["header"]["tensors"]
    assert check["tokenizer_round_trip"] == 1.0
    # Measured: llama.cpp's greedy answer from this Q4_1 file is not "Paris" ("L'Étoile, la
    # Marseillaise, ..."), though transformers' dequantization of it and our Q4_K_M re-export answer
    # Paris: the check records the answer, it cannot hold a quantized file to a torch reference.
    assert check["greedy_answer"] and check["answer_mentions_paris"] == ("Paris" in check["greedy_answer"])
    assert set(m["checks"]) == {"as_is"}


def test_gguf_bundled_as_is(tmp_path):
    gguf = sources.embedded_gguf()
    recipe = write_recipe(tmp_path, f"  kind: gguf\n  path: {gguf}\n  use_as_is: true\n", name="as-is")
    result = build_in_process(recipe, tmp_path / "build")
    assert result.bundle.name == "laptop-cpu-q4_1"
    assert_as_is_bundle(result, gguf)
    pipeline = Pipeline.load(result.bundle, RuntimeOptions(n_threads=2))  # the bundle verifies and runs as checked
    try:
        answer = "".join(pipeline.session(max_tokens=32).ask("What is the capital of France?")).strip()
    finally:
        pipeline.close()
    assert answer == result.manifest["checks"]["as_is"]["greedy_answer"]


def test_hub_gguf_bundled_as_is(hub, tmp_path):
    gguf = sources.embedded_gguf()
    hub.add_repo("tiny-org/smol-gguf", {"SmolLM2-135M-Instruct.Q4_1.gguf": gguf,
                                        "SmolLM2-135M-Instruct.Q8_0.gguf": b"GGUF not this one"})
    source = hub_source("tiny-org/smol-gguf", '  files: ["*Q4_1.gguf"]\n  use_as_is: true\n')
    result = build_in_process(write_recipe(tmp_path, source, name="hub-as-is"), tmp_path / "build")
    assert_as_is_bundle(result, gguf)
    assert result.manifest["source"]["revision_sha"] == hub.repos["tiny-org/smol-gguf"].sha
    assert not hub.gets("SmolLM2-135M-Instruct.Q8_0.gguf")


def test_allow_pickle_converts_to_safetensors(hub, tmp_path, tiny_model):
    """allow_pickle: true on a pickles-only repo: the .bin is fetched, loaded weights-only, converted."""
    import io

    import torch
    from safetensors.torch import load_file

    state = load_file(str(tiny_model("llama") / "model.safetensors"))
    buf = io.BytesIO()
    torch.save(state, buf)
    files = {n: c for n, c in hub.repos[REPO].files.items() if not n.endswith(".safetensors")}
    files["pytorch_model.bin"] = buf.getvalue()
    hub.add_repo("tiny-org/pickled", files)
    recipe = write_recipe(tmp_path, hub_source("tiny-org/pickled", "  allow_pickle: true\n"))
    result = build_in_process(recipe, tmp_path / "build")
    assert hub.gets("pytorch_model.bin")
    assert (tmp_path / "build" / "from-hub" / "source" / "model.safetensors").is_file()
    assert result.manifest["checks"]["f16"]["top1_agreement"] == 1.0
    assert result.manifest["source"]["allow_pickle"] is True


def test_a_published_style_q4_k_m_of_the_embedded_model_answers_paris_as_is(embedded_build, tmp_path):
    # A Q4_K_M GGUF of the embedded model, quantized elsewhere (here: by an earlier build, with its
    # importance matrix), shipped as it is: same bytes in the bundle, and it answers Paris.
    gguf = embedded_build.bundle / embedded_build.manifest["llm"]["file"]
    recipe = write_recipe(tmp_path, f"  kind: gguf\n  path: {gguf}\n  use_as_is: true\n", name="as-is-q4km")
    result = build_in_process(recipe, tmp_path / "build")
    rel = result.manifest["llm"]["file"]
    assert sha256_file(result.bundle / rel) == sha256_file(gguf)
    check = result.manifest["checks"]["as_is"]
    assert result.manifest["llm"]["quant"] == "q4_k_m" and check["tokenizer_round_trip"] == 1.0
    assert check["answer_mentions_paris"] and "Paris" in check["greedy_answer"]


def test_an_embedding_model_from_the_hub(hub, tmp_path, tiny_model):
    """A sentence-transformers repo (all-MiniLM-L6-v2's files, 1_Pooling/ included) as the bundle's embedding model:
    downloaded without its pickles, exported and checked like the embedded one, its commit in the manifest."""
    from vishwamai_edge.sources.embedded import embedded_sentence_embedder

    minilm = embedded_sentence_embedder()
    files = {str(p.relative_to(minilm)): p for p in minilm.rglob("*") if p.is_file()}
    files["pytorch_model.bin"] = b"\x80\x02pickle, never downloaded"
    hub.add_repo("acme/minilm", files)
    recipe = tmp_path / "emb.yaml"
    recipe.write_text(f"name: emb\nsource:\n  kind: hf\n  path: {tiny_model('llama')}\n{FAST_EXPORT}"
                      "embeddings:\n  kind: hub\n  repo: acme/minilm\n")
    result = build_in_process(recipe, tmp_path / "out")
    entry = result.manifest["encoders"]["embedding"]
    assert entry["source"]["name"] == "acme/minilm" and len(entry["source"]["revision_sha"]) == 40
    assert entry["check"]["min_cosine"] >= 0.9999 and entry["pooling"] == "mean"
    fetched = {path.rsplit("/", 1)[-1] for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path}
    assert "model.safetensors" in fetched and "pytorch_model.bin" not in fetched, fetched
