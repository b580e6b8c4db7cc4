"""TensorRT Edge-LLM export, run for real: the embedded SmolLM2 through `tensorrt-edgellm-export`.

The exporter lives in its own venv (bash .ci/install-edgellm); without it these tests fail with a
message naming that script. The ONNX it writes needs TensorRT plugins (AttentionPlugin), so
ONNX Runtime cannot run it: the checks are structural (files, graph contract, config) and on
the one tensor that leaves the graph, the embedding table, compared value by value with the HF
weights. The engine is built on the Jetson; here only its command line is asserted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from needs import missing

from vishwamai_edge.errors import ExportError
from vishwamai_edge.export import edgellm
from vishwamai_edge.export.edgellm import (
    EdgeLLMNotInstalled,
    check_edgellm_export,
    device_build_command,
    edgellm_python,
    export_edgellm,
)
from vishwamai_edge.sources.embedded import embedded_hf_dir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / ".ci" / "install-edgellm"
SMOLLM2 = {"hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152}


@pytest.fixture(scope="module")
def edgellm_venv():
    try:
        return edgellm_python().parent.parent
    except EdgeLLMNotInstalled as exc:
        missing(f"{exc} -- run: bash .ci/install-edgellm")


@pytest.fixture(scope="module")
def smollm2_export(edgellm_venv, tmp_path_factory):
    hf_dir = embedded_hf_dir()
    out = tmp_path_factory.mktemp("edgellm") / "smollm2-fp16"
    return hf_dir, export_edgellm(hf_dir, out, dtype="fp16")


def test_smollm2_fp16_export_checked(smollm2_export):
    _, result = smollm2_export
    out = result.path
    # Atomic: only the final folder and no temporaries beside it.
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    for name in (
        "llm/model.onnx",
        "llm/model.onnx.data",
        "llm/config.json",
        "llm/embedding.safetensors",
        "llm/tokenizer.json",
        "llm/tokenizer_config.json",
        "llm/chat_template.jinja",
        "edgellm-export.log",
    ):
        assert (out / name).is_file() and result.files[name] > 0, name
    assert "Model type    : llama" in result.log.read_text()

    assert result.tool_version == "0.11.0" and result.opset == 24
    assert result.config == {
        **SMOLLM2,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "head_dim": 64,
    }
    assert result.attention_plugins == SMOLLM2["num_hidden_layers"]
    assert result.quantized_nodes == 0  # fp16 source, no quantization asked
    inputs = {v["name"]: v for v in result.inputs}
    outputs = {v["name"]: v for v in result.outputs}
    assert inputs["inputs_embeds"]["shape"] == ["physical_tokens", 576]
    assert inputs["inputs_embeds"]["dtype"] == "FLOAT16"
    assert sum(n.startswith("past_key_values_") for n in inputs) == 30
    assert sum(n.startswith("present_key_values_") for n in outputs) == 30
    # Paged KV cache: [K/V, pages, tokens per page, kv heads, head dim]
    assert inputs["past_key_values_0"]["shape"] == [2, "num_pages", 128, 3, 64]
    assert outputs["logits"]["shape"] == ["num_sequences", 49152]

    # fp16 weights in, fp16 weights out: 134.5 M parameters x 2 bytes, all in model.onnx.data,
    # plus the separate embedding table (tied lm_head stays in the graph).
    assert result.external_data_bytes <= result.files["llm/model.onnx.data"]
    assert 260e6 < result.files["llm/model.onnx.data"] < 280e6
    assert result.embedding_shape == (49152, 576)
    assert result.files["llm/embedding.safetensors"] >= 49152 * 576 * 2
    assert result.embedding_max_abs_diff == 0.0  # the embedded model is fp16 already: exact
    assert result.seconds > 0
    manifest = result.manifest()
    assert manifest["embedding_shape"] == [49152, 576] and manifest["attention_plugins"] == 30


def test_device_build_command(smollm2_export):
    _, result = smollm2_export
    cmd = device_build_command("/data/bundles/smollm2/edgellm", "/data/engines/smollm2", 1024, 4096, 1)
    assert cmd == [
        "llm_build",
        "--onnxDir=/data/bundles/smollm2/edgellm/llm",
        "--engineDir=/data/engines/smollm2",
        "--maxInputLen=1024",
        "--maxKVCacheCapacity=4096",
        "--maxBatchSize=1",
    ]
    # --onnxDir is the folder holding model.onnx and config.json
    assert (result.path / "llm" / "model.onnx").is_file() and (result.path / "llm" / "config.json").is_file()
    with pytest.raises(ExportError, match="at most max_seq_len"):
        device_build_command("/a", "/b", 8192, 4096, 1)


def test_check_rejects_tampered_export(smollm2_export, tmp_path):
    """The checks do catch a wrong config field and an embedding that is not the HF one."""
    hf_dir, result = smollm2_export
    copy = tmp_path / "copy"
    shutil.copytree(result.path, copy, copy_function=os.link)  # hard links: no 300 MB copy
    config = copy / "llm" / "config.json"
    text = config.read_text()
    config.unlink()  # break the link before writing
    config.write_text(text.replace('"num_hidden_layers": 30', '"num_hidden_layers": 29'))
    with pytest.raises(ExportError, match="num_hidden_layers=29, the HF config 30"):
        check_edgellm_export(copy, hf_dir)
    config.unlink()
    config.write_text(text)

    from safetensors.numpy import load_file, save_file

    path = copy / "llm" / "embedding.safetensors"
    tables = load_file(path)
    (key,) = tables
    tables[key] = tables[key].copy()
    tables[key][7, 3] += np.float16(0.25)
    path.unlink()
    save_file(tables, path)
    with pytest.raises(ExportError, match="beyond fp16 rounding .1 values, first in row 7"):
        check_edgellm_export(copy, hf_dir)


def test_unsupported_architecture_one_line_error(edgellm_venv, tmp_path):
    """A GPT-2 folder: Edge-LLM 0.11 has no GPT-2 path and dies reading `hidden_size`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_dir = tmp_path / "gpt2-tiny"
    config = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(config).save_pretrained(hf_dir)
    out = tmp_path / "out"
    with pytest.raises(ExportError) as info:
        export_edgellm(hf_dir, out)
    message = str(info.value)
    assert "\n" not in message
    assert "exit 1" in message and "(model type gpt2)" in message and "KeyError: 'hidden_size'" in message
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["gpt2-tiny", "out.failed.log"]
    assert "Traceback" in (tmp_path / "out.failed.log").read_text()


def test_missing_venv_names_setup_script(tmp_path, monkeypatch):
    monkeypatch.setenv(edgellm.VENV_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(EdgeLLMNotInstalled) as info:
        edgellm_python()
    assert "bash .ci/install-edgellm" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(EdgeLLMNotInstalled):
        export_edgellm(embedded_hf_dir(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_arguments_rejected_before_running(tmp_path):
    with pytest.raises(ExportError, match="unknown Edge-LLM quantization 'int8'"):
        export_edgellm(tmp_path, tmp_path / "out", quantization="int8")
    with pytest.raises(ExportError, match="unknown Edge-LLM dtype"):
        export_edgellm(tmp_path, tmp_path / "out", dtype="half")


def test_install_script_in_step_with_module():
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text
    assert edgellm.EDGELLM_REQUIREMENT in text and edgellm.TORCH_REQUIREMENT in text
    assert edgellm.VENV_ENV in text and ".cache/vishwamai-edge/venvs/tensorrt-edgellm" in text
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("Usage: ")
