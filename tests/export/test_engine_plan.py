"""TensorRT-LLM engine plans per target, the trtllm-build command lines per flavour, and the build
script run against a fake trtllm-build (up to the call into the engine builder)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from needs import missing

from vishwamai_edge.errors import ExportError, UserError
from vishwamai_edge.export.engine_plan import build_script, partial_dir, plan_engine, run_build
from vishwamai_edge.memory_plan import ModelSize
from vishwamai_edge.targets import TARGETS

# LLaVA-1.5-7B's language model (Vicuna-7B) with a CLIP-L/336 tower: 576 rows per image
LLAVA = ModelSize("llava-1.5-7b", layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32,
                  head_dim=128, vocab=32064, encoder_params=0.3e9, image_tokens=576)
SMOL = ModelSize("smollm2-135m", layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3,
                 head_dim=64, vocab=49152, tied=True)

# target -> (batch, llava KV fraction, smol KV fraction)
EXPECTED = {
    "orin-nano-8": (1, 0.441, 0.1),
    "orin-nx-16": (1, 0.246, 0.1),
    "orin-agx-32": (4, 0.369, 0.1),  # 9.45 GB (4 x 4096 x 1.1) of 25.61 free
    "orin-agx-64": (4, 0.164, 0.1),
    "x86-cuda": (8, 0.9, 0.1),
}


def _command(batch: int, n_ctx: int, flavor: str, table: int = 0) -> list[str]:
    cmd = ["trtllm-build", "--checkpoint_dir", "ckpt", "--output_dir", "eng",
           "--max_batch_size", str(batch), "--max_input_len", str(n_ctx - 1), "--max_seq_len", str(n_ctx),
           "--max_num_tokens", str(n_ctx - 1 + batch), "--max_beam_width", "1",
           "--gpt_attention_plugin", "float16", "--gemm_plugin", "float16",
           "--remove_input_padding", "enable", "--context_fmha", "enable"]
    cmd += ["--paged_kv_cache", "enable"] if flavor == "v0.12-jetson" else ["--kv_cache_type", "paged"]
    return cmd + (["--max_multimodal_len", str(table)] if table else [])


@pytest.mark.parametrize("target", list(EXPECTED))
def test_plans_and_commands_per_target(target):
    batch, llava_fraction, smol_fraction = EXPECTED[target]
    flavor = "current" if target == "x86-cuda" else "v0.12-jetson"

    plan = plan_engine(LLAVA, TARGETS[target], n_ctx=4096)
    assert (plan.max_batch_size, plan.max_input_len, plan.max_seq_len) == (batch, 4095, 4096)
    assert plan.max_prompt_embedding_table_size == 576 * batch and plan.rows_per_image == 576
    assert plan.kv_cache_free_gpu_mem_fraction == pytest.approx(llava_fraction, abs=1e-3)
    assert plan.default_flavor == flavor and plan.fmt == "int4_awq" and "W4A16_AWQ" in plan.weight_only
    assert plan.build_command("ckpt", "eng") == _command(batch, 4096, flavor, 576 * batch)
    other = "current" if flavor == "v0.12-jetson" else "v0.12-jetson"
    assert plan.build_command("ckpt", "eng", other) == _command(batch, 4096, other, 576 * batch)

    text = plan_engine(SMOL, TARGETS[target], n_ctx=2048, fmt="fp16")
    assert text.max_prompt_embedding_table_size == 0 and text.weight_only is None
    assert text.kv_cache_free_gpu_mem_fraction == smol_fraction  # a small cache: the lower clamp
    assert text.build_command("ckpt", "eng") == _command(batch, 2048, flavor)
    data = json.loads(text.to_json())
    assert data["max_batch_size"] == batch and data["default_flavor"] == flavor


def test_kv_budget_is_the_headroom_after_weights_encoders_runtime():
    plan = plan_engine(LLAVA, TARGETS["orin-nano-8"], n_ctx=4096)
    # 6.5 GB available; int4 weights 3.89, TensorRT-LLM runtime 1.0 -> 1.61 free; encoders 0.9
    assert plan.free_after_engine_gb == pytest.approx(1.61, abs=0.01)
    assert plan.kv_cache_budget_gb == pytest.approx(1.61 - 0.9, abs=0.01)
    assert plan.kv_cache_tokens < 4096 and not plan.fits  # the memory plan says so too
    # two images a request, batch 4 on an AGX
    agx = plan_engine(LLAVA, TARGETS["orin-agx-64"], n_ctx=4096, max_images_per_request=2)
    assert agx.max_prompt_embedding_table_size == 2 * 576 * 4


def test_unsupported_targets_and_sizes():
    with pytest.raises(UserError, match="no TensorRT-LLM backend"):
        plan_engine(SMOL, TARGETS["laptop-cpu"], 2048)
    with pytest.raises(UserError, match="do not fit"):
        plan_engine(LLAVA, TARGETS["x86-cuda"], 1024, max_images_per_request=2)
    with pytest.raises(UserError, match="flavour"):
        plan_engine(SMOL, TARGETS["x86-cuda"], 2048).build_command("a", "b", "v0.9")


FAKE_BUILD = """#!/usr/bin/env bash
# records its argv (one per line) and writes what trtllm-build writes
printf '%s\\n' "$@" > "$FAKE_ARGV"
out=""
while [ $# -gt 0 ]; do
    if [ "$1" = "--output_dir" ]; then out="$2"; fi
    shift
done
mkdir -p "$out"
echo fake > "$out/rank0.engine"
echo '{"build_config": {}}' > "$out/config.json"
"""


@pytest.fixture
def fake_trtllm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "trtllm-build"
    tool.write_text(FAKE_BUILD)
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ARGV", str(tmp_path / "argv.txt"))
    return tmp_path / "argv.txt"


def _bundle(tmp_path: Path) -> Path:
    out = tmp_path / "bundle dir"  # a space: the script must quote
    (out / "trtllm-ckpt").mkdir(parents=True)
    (out / "trtllm-ckpt" / "config.json").write_text("{}")
    return out


def test_script_passes_bash_n_and_shellcheck(tmp_path):
    if shutil.which("shellcheck") is None:
        missing("shellcheck is not installed")
    for target, model in (("orin-nano-8", LLAVA), ("x86-cuda", SMOL)):
        script = tmp_path / f"{target}.sh"
        script.write_text(build_script(plan_engine(model, TARGETS[target], 2048)))
        subprocess.run(["bash", "-n", str(script)], check=True)
        res = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout


def test_script_runs_the_planned_command_and_writes_the_marker(tmp_path, fake_trtllm):
    plan = plan_engine(LLAVA, TARGETS["orin-agx-64"], n_ctx=4096)
    out = _bundle(tmp_path)
    result = run_build(plan, out, build=True)  # auto (None) also needs an importable tensorrt_llm
    assert result["built"] is True
    argv = fake_trtllm.read_text().splitlines()
    assert ["trtllm-build"] + argv == plan.build_command("trtllm-ckpt", partial_dir("engine"), "v0.12-jetson")
    engine = out / "engine"
    assert (engine / "rank0.engine").is_file() and not (out / partial_dir("engine")).exists()
    marker = json.loads((engine / "build.json").read_text())
    assert marker["ok"] is True and marker["flavor"] == "v0.12-jetson" and marker["target"] == "orin-agx-64"
    assert marker["command"] == ["trtllm-build"] + argv and marker["finished_utc"].endswith("Z")
    assert result["marker"] == marker
    assert json.loads((out / "plan.json").read_text())["max_prompt_embedding_table_size"] == 2304


def test_without_trtllm_the_plan_and_script_wait_for_the_device(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no trtllm-build
    plan = plan_engine(SMOL, TARGETS["x86-cuda"], 2048, fmt="fp16")
    out = _bundle(tmp_path)
    result = run_build(plan, out)
    assert result["built"] is False and (out / "plan.json").is_file() and os.access(out / "build.sh", os.X_OK)
    assert not (out / "engine").exists()
    res = subprocess.run(["bash", str(out / "build.sh")], capture_output=True, text=True)
    assert res.returncode == 127 and "trtllm-build not found" in res.stderr and "WITH_TRTLLM=1" in res.stderr
    with pytest.raises(ExportError, match="exit 127"):
        run_build(plan, out, build=True)


def test_script_refuses_a_missing_checkpoint(tmp_path, fake_trtllm):
    plan = plan_engine(SMOL, TARGETS["orin-nx-16"], 2048, fmt="fp16")
    run_build(plan, tmp_path / "b", build=False)
    res = subprocess.run(["bash", str(tmp_path / "b" / "build.sh")], capture_output=True, text=True)
    assert res.returncode == 2 and "no TensorRT-LLM checkpoint" in res.stderr and not fake_trtllm.exists()
