import pytest

from vishwamai_edge.errors import UserError
from vishwamai_edge.profile.scenarios import DEFAULT_SCENARIOS, context_for, parse_names, plan
from vishwamai_edge.runtime.manifest import Manifest


def manifest(backend: str = "llamacpp", **encoders) -> Manifest:
    return Manifest.model_validate({"name": "t", "llm": {"file": "llm/m.gguf", "backend": backend},
                                    "encoders": encoders})


MANIFEST = manifest()


def test_names():
    assert parse_names(None) == DEFAULT_SCENARIOS
    assert parse_names("short") == ["chat", "prompt-512"]
    assert parse_names("overhead, chat,chat") == ["chat", "overhead"]  # overhead always last
    with pytest.raises(UserError, match="unknown scenario 'prompt-99'"):
        parse_names("chat,prompt-99")


def test_encoder_scenarios_need_encoders():
    planned = {p.scenario.name: p.skip_reason for p in plan(["chat", "image", "audio"], MANIFEST, 4096, 64)}
    assert planned["chat"] is None
    assert "no image encoder" in planned["image"] and "no audio encoder" in planned["audio"]
    with_image = manifest(image={"kind": "vision", "file": "encoders/vision.onnx"},
                          audio={"kind": "speech-to-text", "file": "encoders/audio.onnx"})
    planned = {p.scenario.name: p.skip_reason for p in plan(["image", "audio"], with_image, 4096, 64)}
    assert planned["image"] is None
    assert planned["audio"] is None  # the speech encoder runs too


def test_context_sizing():
    assert context_for(["chat", "prompt-512"], 64) == 768
    assert context_for(DEFAULT_SCENARIOS, 64) == 2304
    planned = {p.scenario.name: p.skip_reason
               for p in plan(["prompt-512", "prompt-2048"], MANIFEST, 1024, 64)}
    assert planned["prompt-512"] is None
    assert "needs a context of 2120" in planned["prompt-2048"]


def test_overhead_needs_llamacpp():
    other = manifest("trtllm")
    (p,) = plan(["overhead"], other, 4096, 64)
    assert "llama.cpp bundle" in p.skip_reason


def test_audio_scenario_plans_and_sizes():
    speech = manifest(audio={"kind": "speech-to-text"})
    (p,) = plan(["audio"], speech, 512, 64)
    assert p.skip_reason is None
    (p,) = plan(["audio"], speech, 100, 64)
    assert "needs a context of 128" in p.skip_reason


def test_profile_clip_without_espeak_is_a_fixed_chirp():
    import numpy as np

    from vishwamai_edge.profile.measure import CHIRP_QUESTION, profile_clip

    a, b = profile_clip(espeak=None), profile_clip(espeak="no-such-espeak-ng")
    assert a.source == b.source == "chirp" and a.seconds == 5.0 and a.sample_rate == 16000
    assert np.array_equal(a.samples, b.samples) and a.samples.dtype == np.float32
    assert a.text == CHIRP_QUESTION and "chirp" in a.description  # no words: a question is typed beside it
