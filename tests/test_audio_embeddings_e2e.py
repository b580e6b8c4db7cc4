"""Audio into the LLM as embeddings, end to end on tiny random models: a Whisper encoder + frame-stacking
projector aligned to a tiny LLM (`align`, audio parts), built to an F32 GGUF + fp32 audio.onnx bundle whose
manifest says `encoders.audio.mode: embeddings`; the runtime splices the ONNX rows at `<audio>` and
llama.cpp's logits equal the torch composite's."""

from __future__ import annotations

import base64
import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from whisper_models import build_tiny_whisper_encoder_folder, write_tone

QUIET = Console(stderr=True, quiet=True)
STACK = 10
# max |logit difference| at the last position, F32 GGUF + fp32 ONNX against the torch composite:
# measured 5.7e-3 on these tiny random models (logits about +-2.6). It is llama.cpp's own: the ONNX
# rows are within 6e-7 of torch's, and torch's rows fed to llama.cpp give the same 5.0e-3 (its KV
# cache is F16; a text-only prompt of 750 tokens differs by 8.5e-4). The top token must agree.
TOLERANCE = 2e-2
ROWS_TOLERANCE = 1e-5  # max |ONNX row - torch row|, fp32


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        raw = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        return raw.astype(np.float32) / 32768.0, w.getframerate()


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory):
    from vishwamai_edge.build import build
    from vishwamai_edge.recipe import Recipe
    from vishwamai_edge.targets import get_target

    root = tmp_path_factory.mktemp("audio-embeds")
    whisper = build_tiny_whisper_encoder_folder(root / "whisper")
    rows = []
    for i in range(6):
        write_tone(root / f"t{i}.wav", 300.0 + 400 * i, seconds=0.6 + 0.1 * i, seed=i)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "audio", "audio": f"t{i}.wav"}, {"type": "text", "text": "Pitch?"}]},
            {"role": "assistant", "content": "High." if i % 2 else "Low."}]})
    (root / "tones.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = Recipe.model_validate({
        "name": "tiny-audio", "source": {"kind": "hf", "path": str(tiny_model("llama"))},
        "export": {"gguf": {"outtype": "f32", "quants": [], "imatrix": False}, "audio": {"dtype": "fp32"}},
        "finetune": {"method": "align", "dataset": {"train": str(root / "tones.jsonl")}, "steps": 3,
                     "batch_size": 2, "micro_batch_size": 1, "max_seq_len": 256, "lr": 1e-3,
                     "lora": {"r": 4, "alpha": 8},
                     "align": {"encoder": {"kind": "whisper", "path": str(whisper)}, "projector": {"stack": STACK},
                               "stage2_steps": 1}}})
    recipe.path = root / "tiny-audio.yaml"
    result = build(recipe, get_target("laptop-cpu"), root / "build", quant="f32", n_threads=2, console=QUIET)
    return root, result


def test_the_manifest_lists_an_audio_encoder_in_embeddings_mode(built):
    _, result = built
    entry = result.manifest["encoders"]["audio"]
    assert entry["mode"] == "embeddings" and entry["file"] == "encoders/audio.onnx"
    assert (entry["n_tokens"], entry["hidden"], entry["n_mels"], entry["stack"]) == (150, 64, 80, STACK)
    assert entry["check"]["max_rel_diff"] < 1e-4  # checked by the build, against torch
    assert result.manifest["llm"]["audio_token"]["text"] == "<audio>"
    assert "audio" in result.manifest["checks"] and (result.bundle / "encoders/audio.onnx").is_file()


def test_runtime_logits_equal_the_torch_composite(built):
    import torch
    import transformers

    from vishwamai_edge.runtime.audio import window_features
    from vishwamai_edge.runtime.chat_template import render_chat
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline
    from vishwamai_edge.train.aligned_folder import load_aligned, splice

    root, result = built
    aligned = load_aligned(root / "build/tiny-audio/finetune/aligned")
    llm = transformers.AutoModelForCausalLM.from_pretrained(aligned.llm_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(aligned.llm_dir)
    audio_id, n = aligned.image_token["id"], aligned.projector.tokens
    pipeline = Pipeline.load(result.bundle, RuntimeOptions(n_threads=2))
    worst = 0.0
    try:
        session = pipeline.session()
        for name in ("t0.wav", "t3.wav"):
            samples, rate = read_wav(root / name)
            messages = [{"role": "user", "content": [{"type": "audio", "samples": samples, "rate": rate},
                                                     {"type": "text", "text": "Pitch?"}]}]
            prompt = session.prompt(messages)
            assert len(prompt.audio) == 1 and prompt.size == len(prompt.tokens) + n - 1
            onnx_rows = pipeline.encode_audio(prompt.audio)
            pipeline.llm.prefill(prompt.segments([], onnx_rows))
            got = pipeline.llm.logits()
            text = render_chat(pipeline.chat_template, [pipeline.prompts.for_template(m) for m in messages])
            hf = tokenizer(text, add_special_tokens=False)["input_ids"]
            # llama.cpp and transformers tokenize the prompt alike (the tiny GGUF adds a BOS in front)
            assert prompt.tokens[-len(hf):] == hf and len(prompt.tokens) - len(hf) in (0, 1)
            ids = torch.tensor([[t for t in prompt.tokens for t in ([t] * n if t == audio_id else [t])]])
            with torch.no_grad():
                x = torch.from_numpy(window_features(samples, rate, 80)[None])
                rows = aligned.projector(aligned.encoder.module(x))
                want = llm(inputs_embeds=splice(llm.get_input_embeddings()(ids), ids, rows, audio_id)).logits[0, -1]
            rows_diff = float(np.abs(onnx_rows[0] - rows[0].numpy()).max())
            assert rows_diff < ROWS_TOLERANCE, rows_diff
            diff = float(np.abs(got - want.numpy()).max())
            worst = max(worst, diff)
            assert got.argmax() == int(want.argmax())
    finally:
        pipeline.close()
    print("max |logit diff| runtime (F32 GGUF + fp32 ONNX) vs torch", worst)
    assert worst < TOLERANCE


def test_a_session_hears_audio_as_rows_and_refuses_bad_audio(built):
    from vishwamai_edge.errors import InputError
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    root, result = built
    pipeline = Pipeline.load(result.bundle, RuntimeOptions(n_threads=2))
    try:
        assert pipeline.audio_embeds and pipeline.structured_content
        session = pipeline.session(max_tokens=6)
        clip = read_wav(root / "t1.wav")
        first = "".join(session.ask("Pitch?", audio=[clip]))
        stats = session.last_stats
        assert stats.audio_clips == 1 and stats.heard == [] and stats.prompt_tokens > 150
        assert session.messages[-2]["content"][0]["type"] == "audio"
        session.reset()
        assert "".join(session.ask("Pitch?", audio=[clip])) == first  # greedy, the cached rows: the same reply
        with pytest.raises(InputError, match="the audio lasts 31.0 s; this audio encoder takes up to 30 s") as err:
            list(session.ask("Pitch?", audio=[(np.zeros(31 * 16000, np.float32), 16000)]))
        assert "\n" not in str(err.value)
        with pytest.raises(InputError, match="feeds the LLM directly and writes no transcript"):
            pipeline.transcribe(*clip)
        session.reset()
        assert "".join(session.ask("Pitch?", audio=[clip])) == first  # the session still works
    finally:
        pipeline.close()


def test_input_audio_through_the_api_enters_as_rows(built):
    import httpx
    from in_thread_server import serve_in_thread

    from vishwamai_edge.runtime.engine import Engine
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.serve.app import create_app

    root, result = built
    engine = Engine.load(result.bundle, RuntimeOptions(n_threads=2, parallel=None))
    try:
        with serve_in_thread(create_app(engine)) as url:
            data = base64.b64encode((root / "t1.wav").read_bytes()).decode()
            body = {"model": result.manifest["name"], "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                {"type": "text", "text": "Pitch?"}]}]}
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens"] > 150  # the clip took its 150 rows of context
            wav = (root / "t1.wav").read_bytes()
            bad = httpx.post(url + "/v1/audio/transcriptions", files={"file": ("a.wav", wav, "audio/wav")},
                             timeout=60)
            assert bad.status_code == 400 and "writes no transcript" in bad.json()["error"]["message"]
            again = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)  # the server goes on
            assert again.status_code == 200 and again.json()["choices"] == r.json()["choices"]
    finally:
        engine.close()


def test_a_manifest_that_disagrees_with_the_graph_is_refused(built, tmp_path):
    from vishwamai_edge.errors import BundleError
    from vishwamai_edge.runtime.bundle import write_manifest
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    _, result = built
    bundle = tmp_path / "bundle"
    shutil.copytree(result.bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["encoders"]["audio"]["hidden"] = 48  # a projector to another LLM width
    write_manifest(bundle, {k: v for k, v in manifest.items() if k != "files"}, list(manifest["files"]))
    with pytest.raises(BundleError, match=r"audio.onnx takes 80 mel bins and gives 150 x 64 embeddings; the "
                                          r"manifest says 80 bins, 150 x 48") as err:
        Pipeline.load(bundle, RuntimeOptions(n_threads=1))
    assert "\n" not in str(err.value)


def test_chat_audio_command_and_the_profile_audio_run(built):
    import subprocess
    import sys

    from vishwamai_edge.profile.measure import ProfileClip, run_audio
    from vishwamai_edge.runtime.options import RuntimeOptions
    from vishwamai_edge.runtime.pipeline import Pipeline

    root, result = built
    proc = subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", "chat", str(result.bundle), "--audio",
                           str(root / "t1.wav"), "-p", "Pitch?", "--max-tokens", "4", "--threads", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1 audio clip(s) encoded" in proc.stderr and "transcribed" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", "chat", str(result.bundle), "--audio",
                           str(root / "tones.jsonl"), "-p", "Pitch?", "--max-tokens", "4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    pipeline = Pipeline.load(result.bundle, RuntimeOptions(n_threads=2))
    try:
        samples, rate = read_wav(root / "t2.wav")
        run = run_audio(pipeline, ProfileClip(samples, rate, "chirp", "a tone", "Pitch?"), 4)
        assert run["transcribe_s"] == 0.0 and run["encode_s"] > 0 and run["rtf"] > 0 and run["heard"] == []
    finally:
        pipeline.close()


def test_the_ui_shows_audio_heard_as_rows_and_resends_only_the_typed_text():
    from vishwamai_edge.ui.app import _model_text, _said

    shown = _said("Pitch?", True, [], embedded=True)
    assert shown == "🎤 audio, heard by the model itself\n\nPitch?" and _model_text(shown) == "Pitch?"
    assert _model_text(_said("", True, [], embedded=True)) == ""
