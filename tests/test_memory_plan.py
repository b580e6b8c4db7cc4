"""The memory planner against published model sizes, on every Jetson module."""

from __future__ import annotations

import pytest

from vishwamai_edge.errors import UserError
from vishwamai_edge.memory_plan import ModelSize, check_fits, model_size, plan_memory
from vishwamai_edge.targets import TARGETS, get_target

# Published configs (the models' config.json files), reduced to the fields the planner reads.
LLAMA2_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "intermediate_size": 11008, "vocab_size": 32000}
LLAMA3_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "intermediate_size": 14336, "vocab_size": 128256}
LLAVA15_7B = {"text_config": {**LLAMA2_7B, "vocab_size": 32064},
              "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "num_hidden_layers": 24,
                                "intermediate_size": 4096, "patch_size": 14, "image_size": 336},
              "vision_feature_select_strategy": "default"}
VILA15_3B = {"llm_cfg": {"hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 20,
                         "num_key_value_heads": 20, "intermediate_size": 6912, "vocab_size": 32000},
             "vision_tower_cfg": {"model_type": "siglip_vision_model", "hidden_size": 1152, "num_hidden_layers": 27,
                                  "intermediate_size": 4304, "patch_size": 14, "image_size": 384}}


@pytest.mark.parametrize("config, params_b", [(LLAMA2_7B, 6.74), (LLAMA3_8B, 8.03), (VILA15_3B, 2.7)])
def test_parameter_counts_match_the_published_ones(config, params_b):
    assert model_size(config).params / 1e9 == pytest.approx(params_b, rel=0.02)


@pytest.mark.parametrize("config, fmt, published_gb", [
    (LLAMA2_7B, "q4_k_m", 4.08),  # llama-2-7b.Q4_K_M.gguf
    (LLAMA3_8B, "q4_k_m", 4.92),  # Meta-Llama-3-8B-Instruct.Q4_K_M.gguf
    (LLAMA2_7B, "f16", 13.48),  # llama-2-7b f16 safetensors
    (LLAMA3_8B, "int4_awq", 5.73),  # Meta-Llama-3-8B-Instruct-AWQ (fp16 embeddings and head)
])
def test_weight_sizes_match_published_files(config, fmt, published_gb):
    assert model_size(config).weight_bytes(fmt) / 1e9 == pytest.approx(published_gb, rel=0.03)


def test_llava_encoder_and_image_tokens():
    size = model_size(LLAVA15_7B, "llava-1.5-7b")
    assert size.image_tokens == 576
    assert size.encoder_params / 1e6 == pytest.approx(303 + 21, rel=0.03)  # CLIP-L/336 + projector


ALL_ORIN = {"orin-agx-64", "orin-agx-32", "orin-nx-16", "orin-nano-8"}
EXPECTED_FITS = {
    # (model, format, n_ctx): modules it fits on. Orin Nano 8GB keeps 6.5 GB for a model;
    # VILA1.5-3B in fp16 (8.4 GB planned) is what gets killed there, its AWQ INT4 (5.1 GB) fits.
    ("llava", "f16", 4096): {"orin-agx-64", "orin-agx-32"},  # 17.1 GB
    ("llava", "q4_k_m", 4096): {"orin-agx-64", "orin-agx-32", "orin-nx-16"},  # 7.7 GB: 576-token images + 2 GB KV
    ("vila", "int4_awq", 4096): ALL_ORIN,
    ("vila", "f16", 4096): {"orin-agx-64", "orin-agx-32", "orin-nx-16"},
    ("llama3", "f16", 8192): {"orin-agx-64", "orin-agx-32"},
    ("llama3", "q4_k_m", 4096): ALL_ORIN,  # 6.0 GB (GQA: 8 KV heads keep the cache small)
}
MODELS = {"llava": LLAVA15_7B, "vila": VILA15_3B, "llama3": LLAMA3_8B}


@pytest.mark.parametrize("key", list(EXPECTED_FITS))
def test_which_orin_modules_fit(key):
    name, fmt, n_ctx = key
    size = model_size(MODELS[name], name)
    backend = "trtllm" if fmt == "int4_awq" else "llamacpp"
    fits = {t.name for t in TARGETS.values() if t.jetson and plan_memory(size, t, fmt, n_ctx, backend).fits}
    assert fits == EXPECTED_FITS[key]


def test_a_plan_that_does_not_fit_stops_with_numbers_and_what_would():
    plan = plan_memory(model_size(LLAVA15_7B, "llava-1.5-7b"), get_target("orin-nano-8"), "f16", 4096)
    assert not plan.fits and plan.weights_gb > 13
    with pytest.raises(UserError) as info:
        check_fits(plan)
    message = str(info.value)
    assert "does NOT fit" in message and "6.50 GB available" in message
    assert "q4_k_m with runtime.n_ctx=1024 (" in message and "\n" not in message


def test_memory_plan_counts_the_kv_type():
    size = ModelSize(name="m", layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
                     vocab=128256)
    plans = {t: plan_memory(size, get_target("orin-nano-8"), "q4_k_m", 8192, kv_type=t) for t in ("f16", "q8_0", "q4_0")}
    f16 = plans["f16"].kv_cache_gb
    assert f16 == pytest.approx(2 * 32 * 8 * 128 * 8192 * 2 / 1e9)
    assert plans["q8_0"].kv_cache_gb == pytest.approx(f16 * 34 / 64)
    assert plans["q4_0"].kv_cache_gb == pytest.approx(f16 * 18 / 64)
