"""User mistakes end with exit code 2 and one line on stderr, never a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vishwamai_edge.export.gguf import convert_hf_to_gguf


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vishwamai_edge.cli", *args],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory) -> Path:
    return convert_hf_to_gguf(tiny_model("llama"), tmp_path_factory.mktemp("g") / "tiny.gguf", "f16").path


def test_truncated_gguf(tiny_gguf, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_gguf.read_bytes()[:5000])
    assert_one_line_error(run_cli("chat", str(broken), "-p", "hi"), "cannot load", "broken.gguf")


def test_not_a_gguf(tmp_path):
    f = tmp_path / "photo.gguf"
    f.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    assert_one_line_error(run_cli("chat", str(f), "-p", "hi"), "not a GGUF file")


def test_bundle_file_hash_changed(embedded_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(embedded_bundle, copy)  # real copies, not the build's hard links
    gguf = next((copy / "llm").glob("*.gguf"))
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0x01
    gguf.write_bytes(bytes(data))
    assert_one_line_error(run_cli("chat", str(copy), "-p", "hi"), "does not match its sha256")


def test_recipe_unknown_field(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\nexport:\n  gguf:\n    outtype: f16\n    colour: blue\n")
    assert_one_line_error(run_cli("build", "--recipe", str(recipe), "--out", str(tmp_path)),
                          "bad.yaml", "export.gguf.colour: unknown field")


def test_missing_model_folder(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nsource:\n  kind: hf\n  path: no/such/model\n")
    assert_one_line_error(run_cli("build", "--recipe", str(recipe), "--out", str(tmp_path)),
                          "model folder", "does not exist")


def test_truncated_gguf_source(tiny_gguf, tmp_path):
    broken = tmp_path / "src.gguf"
    broken.write_bytes(tiny_gguf.read_bytes()[:3000])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nsource:\n  kind: gguf\n  path: {broken}\n")
    assert_one_line_error(run_cli("build", "--recipe", str(recipe), "--out", str(tmp_path)), "src.gguf")


def test_unknown_target_and_missing_bundle(tmp_path):
    assert_one_line_error(run_cli("build", "--recipe", "recipes/smollm2-135m.yaml", "--target", "pi5",
                                  "--out", str(tmp_path), cwd=Path(__file__).parents[1]), "unknown target 'pi5'")
    assert_one_line_error(run_cli("chat", str(tmp_path / "nothing")), "does not exist")


def test_prompt_longer_than_context(embedded_bundle):
    long_prompt = "word " * 600
    assert_one_line_error(run_cli("chat", str(embedded_bundle), "--n-ctx", "256", "-p", long_prompt),
                          "context holds 256")


@pytest.mark.parametrize("argv, message", [
    (["demo", "--sight"], "No such option: --sight"),  # NoSuchOption
    (["chat"], "Missing argument"),  # MissingParameter
    (["build", "--recipe"], "requires an argument"),  # BadOptionUsage, raised without a context
    (["nosuch"], "No such command"),  # UsageError from the group
    (["serve", "b", "--port", "99999"], "--port"),  # BadParameter: out of range
    (["serve", "b", "--port", "eighty"], "--port"),  # BadParameter: not a number
    (["chat", "b", "--temperature", "-1"], "--temperature"),
    (["chat", "b", "--n-ctx", "10"], "--n-ctx"),
    (["chat", "b", "--threads", "0"], "--threads"),
    (["ui", "b", "--max-queue", "0"], "--max-queue"),
    (["profile", "b", "--repeat", "0"], "--repeat"),
])
def test_usage_errors_print_usage_and_exit_2(argv, message):
    proc = run_cli(*argv)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("Usage: vishwamai-edge"), proc.stderr
    assert message in proc.stderr, proc.stderr


def test_out_of_range_values_are_refused_by_the_library_too(tmp_path):
    from vishwamai_edge.errors import UserError
    from vishwamai_edge.web.listen import check_port_free

    with pytest.raises(UserError, match="not a TCP port"):
        check_port_free("127.0.0.1", 99999)
    with pytest.raises(UserError, match="not an address"):
        check_port_free("no-such-host.invalid", 8000)


def test_tiny_context_on_a_real_bundle_is_one_line(embedded_bundle):
    # a typer-level minimum is one guard; the library refuses it too, before llama.cpp can abort
    from vishwamai_edge.errors import InputError
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    with pytest.raises(InputError, match="at least 64 tokens"):
        Pipeline.load(embedded_bundle, RuntimeOptions(n_ctx=10))


def test_a_build_that_cannot_fit_its_target_stops_before_any_work(tmp_path):
    import json

    from test_memory_plan import LLAVA15_7B

    model = tmp_path / "llava-1.5-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**LLAVA15_7B, "architectures": ["LlavaForConditionalGeneration"]}))
    (model / "model.safetensors").write_bytes(b"")  # never read: the plan stops the build first
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: big\nsource: {{kind: hf, path: {model}}}\nruntime: {{n_ctx: 4096}}\n")
    proc = run_cli("build", "--recipe", str(recipe), "--target", "orin-nano-8", "--quant", "f16",
                   "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "does NOT fit", "6.50 GB available", "q4_k_m with runtime.n_ctx=1024")
    assert not list((tmp_path / "out").rglob("*.gguf")) and not list((tmp_path / "out").rglob("manifest.json"))


def test_bad_kv_types_are_one_line_errors(tiny_gguf):
    from vishwamai_edge.sources.embedded import embedded_gguf

    gguf = str(embedded_gguf())
    for command in (["chat", gguf, "-p", "hi"], ["serve", gguf], ["ui", gguf], ["profile", gguf]):
        assert_one_line_error(run_cli(*command, "--kv-type", "q3_k"), "unknown KV-cache type 'q3_k'", "f16, q8_0, q4_0")
    # the tiny llama's heads of 16 values do not fill q4_0's blocks of 32: llama.cpp refuses the context
    assert_one_line_error(run_cli("chat", str(tiny_gguf), "-p", "hi", "--kv-type", "q4_0"),
                          "refuses a q4_0 KV cache for tiny.gguf")
