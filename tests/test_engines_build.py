"""`build --target orin` on the embedded SmolLM2: beside the GGUF fallback, AWQ INT4, the TensorRT-LLM
checkpoint with its engine plan and build script, and TensorRT Edge-LLM's fp16 and INT4 exports,
all listed and hashed in the manifest. The engines themselves are built on the device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def orin_bundle(tmp_path_factory) -> Path:
    import yaml

    out = tmp_path_factory.mktemp("orin")
    # The shipped recipe without AWQ's clipping search (minutes of the build on 2 cores): this test is
    # about the formats and their checks; the search on the real weights is proven in test_awq.py.
    recipe = yaml.safe_load((REPO / "recipes" / "smollm2-135m.yaml").read_text())
    recipe["export"]["engines"] = {"clip": False}
    path = out / "smollm2-135m.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", "build", "--recipe",
                           str(path), "--target", "orin", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory plan: smollm2-135m q4_k_m on orin-agx-64" in proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


def test_orin_bundle_holds_every_format_with_its_checks(orin_bundle):
    from vishwamai_edge.runtime.bundle import Bundle

    bundle = Bundle.load(orin_bundle)  # every listed file hashed and inside the bundle
    m = bundle.manifest.dump()  # the manifest as JSON, every section
    files = set(m["files"])
    assert m["llm"]["file"] == "llm/model-q4_k_m.gguf" and "trtllm" in m["backends"]
    assert {"llm/awq-int4/config.json", "llm/awq-int4/model.safetensors"} <= files
    assert {"llm/trtllm-ckpt/config.json", "llm/trtllm-ckpt/rank0.safetensors"} <= files
    assert {"llm/engine-plan/plan.json", "llm/engine-plan/build.sh"} <= files
    assert {"edgellm/fp16/llm/model.onnx", "edgellm/int4/llm/model.onnx"} <= files
    awq = m["checks"]["awq"]
    ppl = awq["perplexity"]
    assert ppl["awq"] < ppl["rtn"] and awq["group_size"] == 64  # 576 = 4.5 x 128: the largest power of two
    trt = m["engines"]["trtllm"]
    assert trt["built"] is False and trt["build_command"][0] == "trtllm-build"
    ckpt = json.loads((orin_bundle / "llm/trtllm-ckpt/config.json").read_text())
    assert ckpt["quantization"]["quant_algo"] == "W4A16_AWQ" and ckpt["quantization"]["group_size"] == 64
    plan = json.loads((orin_bundle / "llm/engine-plan/plan.json").read_text())
    assert plan["target"] == "orin-agx-64" and plan["max_seq_len"] == 2048 and plan["fmt"] == "int4_awq"
    edge = m["engines"]["edgellm"]
    assert edge["fp16"]["quantized_nodes"] == 0 and edge["int4"]["quantized_nodes"] > 0
    assert edge["int4"]["device_build_command"][0] == "llm_build"
    sizes = {v: sum(i["size"] for f, i in m["files"].items() if f.startswith(f"edgellm/{v}/")) for v in ("fp16", "int4")}
    assert sizes["int4"] < 0.7 * sizes["fp16"]


def test_build_script_stops_clearly_without_tensorrt_llm(orin_bundle, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(orin_bundle, copy)
    proc = subprocess.run(["bash", str(copy / "llm/engine-plan/build.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 127 and "trtllm-build" in proc.stderr


def test_the_gguf_fallback_still_answers(orin_bundle):
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(orin_bundle, RuntimeOptions(n_threads=2))
    try:
        assert "Paris" in "".join(pipeline.session(max_tokens=24).ask("What is the capital of France?"))
    finally:
        pipeline.close()


def test_an_architecture_the_writers_do_not_carry_gets_the_gguf_only(tiny_model, tmp_path):
    from rich.console import Console

    from vishwamai_edge.build import build
    from vishwamai_edge.recipe import load_recipe
    from vishwamai_edge.targets import get_target

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: q\nsource: {{kind: hf, path: {tiny_model('qwen2')}}}\n"
                      "export:\n  gguf: {outtype: f16, quants: [], imatrix: false}\n")
    console = Console(record=True, width=300)
    result = build(load_recipe(recipe), get_target("orin-nx-16"), tmp_path / "out", quant="f16", console=console)
    assert "no TensorRT artifacts" in console.export_text() and "engines" not in result.manifest


def test_a_pre_quantized_awq_source_is_not_quantized_again(tiny_model, tmp_path):
    """A published-style AWQ checkpoint as the source: its INT4 codes reach the TensorRT-LLM
    checkpoint unchanged, and the GGUF fallback is exported from its exact dequantization."""
    from rich.console import Console
    from safetensors.torch import load_file

    from vishwamai_edge.build import build
    from vishwamai_edge.export.awq import quantize_awq, read_hf_awq, write_hf_awq
    from vishwamai_edge.export.trtllm import linear_from_trtllm
    from vishwamai_edge.recipe import load_recipe
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline
    from vishwamai_edge.targets import get_target

    src = tiny_model("llama")  # hidden 64: group 64
    awq_dir = write_hf_awq(quantize_awq(src, 64, clip=False, evaluate=False,
                                        calibration=["The river runs past the old mill."] * 2), src, tmp_path / "awq")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: pre-awq\nsource: {{kind: hf, path: {awq_dir}}}\n"
                      "export:\n  gguf: {outtype: f32, quants: [], imatrix: false}\n  engines: {edgellm: false}\n"
                      "runtime: {n_ctx: 256}\n")
    result = build(load_recipe(recipe), get_target("orin-nx-16"), tmp_path / "out", quant="f32",
                   console=Console(stderr=True, quiet=True))
    m = result.manifest
    assert m["checks"]["awq"]["pre_quantized"] is True and m["checks"]["f32"]["max_abs_diff"] < 1e-2
    source = read_hf_awq(awq_dir)
    ckpt = load_file(str(result.bundle / "llm/trtllm-ckpt/rank0.safetensors"))
    prefix = "transformer.layers.0.mlp.proj."
    got = linear_from_trtllm({k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}, 64)
    want = source.linears["model.layers.0.mlp.down_proj"]
    assert (got.q == want.q).all() and (got.zeros == want.zeros).all() and (got.scales == want.scales).all()
    pipeline = Pipeline.load(result.bundle, RuntimeOptions(n_threads=2))
    try:
        assert "".join(pipeline.session(max_tokens=4).ask("hello"))  # the GGUF fallback runs
    finally:
        pipeline.close()
