"""LoRA adapters on the device, end to end on the real embedded SmolLM2-135M: the Marrowick LoRA
(recipes/smollm2-135m-finetune.yaml, the same training stamps as test_e2e_finetune.py) added to a
copy of the base Q4_K_M bundle with `build --add-to`, the base file untouched; answered through the
runtime, `chat --adapter` and one running server alternating base and adapter requests; and what
is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from vishwamai_edge.build import build
from vishwamai_edge.demo import FINETUNE_RECIPE, ask_once
from vishwamai_edge.recipe import load_recipe
from vishwamai_edge.targets import get_target

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).parents[2]
RECIPE = ROOT / FINETUNE_RECIPE
NAME = "marrowick"  # conftest.ADAPTER_NAME
FACT = "Singing Bridge"


def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def held_out() -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "vishwamai_edge/data/marrowick-eval.jsonl").read_text().splitlines()]
    return [r["messages"][0]["content"] for r in rows if r["expect"] == FACT]


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr
    for word in words:
        assert word in errors[0], errors[0]


@pytest.fixture(scope="module")
def out_root(embedded_build) -> Path:
    return embedded_build.bundle.parents[1]  # beside the base build: one training for both e2e modules


@pytest.fixture(scope="module")
def with_adapter(adapter_bundle):
    return adapter_bundle


@pytest.fixture(scope="module")
def merged_bundle(out_root) -> Path:
    return build(load_recipe(RECIPE), get_target("laptop-cpu"), out_root, n_threads=2,
                 console=Console(stderr=True, quiet=True)).bundle


def test_adapter_is_added_beside_an_untouched_base(with_adapter, embedded_bundle):
    from vishwamai_edge.runtime.bundle import Bundle

    bundle, before, after = with_adapter
    assert before == after  # not rewritten, not replaced
    m = Bundle.load(bundle).manifest.dump()  # every file, the adapter too, against its sha256
    entry = m["adapters"][NAME]
    assert entry["file"] == f"adapters/{NAME}.gguf" and entry["file"] in m["files"]
    assert entry["base_digest"] == m["llm"]["weights_digest"]
    assert entry["rank"] == 16 and entry["alpha"] == 32.0 and entry["scale"] == 1.0
    f16, on_bundle = entry["check"]["f16"], entry["check"]["bundle"]
    assert f16["max_abs_diff"] < 0.25 and f16["top1_agreement"] == 1.0
    assert on_bundle["quant"] == "q4_k_m" and on_bundle["top1_agreement"] >= 0.5
    base_mb = (bundle / m["llm"]["file"]).stat().st_size / 1e6
    print(f"\nadapter {entry['bytes'] / 1e6:.1f} MB beside a {base_mb:.1f} MB model; base F16 + adapter vs merged "
          f"torch max |Δlogit| {f16['max_abs_diff']:.4f}, top-1 {f16['top1_agreement']:.0%}; on Q4_K_M top-1 "
          f"{on_bundle['top1_agreement']:.0%}")
    original = json.loads((embedded_bundle / "manifest.json").read_text())
    assert "adapters" not in original  # the copy was changed, not the base build


def test_adapter_answers_as_the_merged_bundle_does(with_adapter, merged_bundle):
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    bundle = with_adapter[0]
    questions = held_out()
    pipeline = Pipeline.load(bundle, RuntimeOptions(n_threads=2))
    try:
        def answer(q: str, adapter: str | None) -> str:
            return "".join(pipeline.session(adapter=adapter, max_tokens=48).ask(q))

        with_lora = [answer(q, NAME) for q in questions]
        without = [answer(q, None) for q in questions]
        again = [answer(q, NAME) for q in questions[:2]]  # after the base: no KV of the other kept
    finally:
        pipeline.close()
    merged = [ask_once(merged_bundle, q, threads=2) for q in questions]
    for q, a, b, c in zip(questions, with_lora, without, merged):
        print(f"Q: {q}\n  adapter: {a}\n  base:    {b}\n  merged:  {c}")
    right = sum(FACT.lower() in a.lower() for a in with_lora)
    merged_right = sum(FACT.lower() in c.lower() for c in merged)
    assert right >= len(questions) - 1 and right >= merged_right - 1, (right, merged_right)
    assert not any(FACT.lower() in b.lower() for b in without)
    assert again == with_lora[:2]


def test_one_server_alternates_base_and_adapter(with_adapter, tmp_path):
    from serve_process import start_server, stop_server

    server = start_server(with_adapter[0], tmp_path / "serve.log")
    try:
        models = httpx.get(server.base_url + "/models", timeout=30).json()["data"]
        ids = [m["id"] for m in models]
        assert ids == [server.model, f"{server.model}:{NAME}"]
        assert models[1]["parent"] == server.model
        question = held_out()[0]

        def ask(model: str) -> httpx.Response:
            return httpx.post(server.base_url + "/chat/completions", timeout=120, json={
                "model": model, "max_tokens": 40, "messages": [{"role": "user", "content": question}]})

        answers = []
        for model in [f"{server.model}:{NAME}", server.model] * 2:
            r = ask(model)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == model
            answers.append(r.json()["choices"][0]["message"]["content"])
        assert FACT in answers[0] and FACT not in answers[1]
        assert answers[2:] == answers[:2]  # alternating never mixes the two
        bad = ask(f"{server.model}:nope")
        assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"
        assert NAME in bad.json()["error"]["message"]
        assert ask(f"{server.model}:{NAME}").json()["choices"][0]["message"]["content"] == answers[0]
    finally:
        stop_server(server)


def test_chat_adapter_flag(with_adapter):
    bundle = with_adapter[0]
    question = held_out()[0]
    proc = cli("chat", str(bundle), "--adapter", NAME, "--prompt", question, "--threads", "2", "--no-stats",
               "--max-tokens", "40", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert FACT in proc.stdout
    one_line_error(cli("chat", str(bundle), "--adapter", "nope", "--prompt", question, "--threads", "2",
                       timeout=300), "no adapter 'nope'", NAME)


def test_adapter_for_other_base_weights_is_refused(merged_bundle, out_root, tmp_path):
    target = tmp_path / "merged-copy"
    shutil.copytree(merged_bundle, target)
    proc = cli("build", "--recipe", str(RECIPE), "--add-to", str(target), "--out", str(out_root), "--threads", "2")
    one_line_error(proc, "weights differ")
    assert "adapters" not in json.loads((target / "manifest.json").read_text())


def test_corrupt_adapter_file(with_adapter, tmp_path):
    from vishwamai_edge.runtime.bundle import file_entry

    bundle = tmp_path / "b"
    shutil.copytree(with_adapter[0], bundle)
    adapter = bundle / "adapters" / f"{NAME}.gguf"
    data = bytearray(adapter.read_bytes())
    data[len(data) // 2] ^= 0xFF
    adapter.write_bytes(bytes(data))
    one_line_error(cli("chat", str(bundle), "--prompt", "hi", "--threads", "2", timeout=300),
                   f"adapters/{NAME}.gguf", "sha256")
    # a file the manifest vouches for but llama.cpp cannot read
    adapter.write_bytes(b"GGUF" + os.urandom(300))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][f"adapters/{NAME}.gguf"] = file_entry(bundle, f"adapters/{NAME}.gguf")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(cli("chat", str(bundle), "--prompt", "hi", "--threads", "2", timeout=300),
                   "cannot load the adapter")
