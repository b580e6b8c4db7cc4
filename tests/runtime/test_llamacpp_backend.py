"""The llama.cpp backend on a tiny random model: embedding prefill, prefix reuse, limits."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from vishwamai_edge.errors import BundleError, ContextOverflowError
from vishwamai_edge.export.gguf import convert_hf_to_gguf
from vishwamai_edge.runtime.backends import EmbeddingSegment, SamplingParams, TokenSegment
from vishwamai_edge.runtime.backends.llamacpp import LlamaCppBackend


@pytest.fixture(scope="module")
def tiny(tiny_model, tmp_path_factory):
    hf_dir = tiny_model("llama")
    # F32 so llama.cpp's own embedding lookup returns exactly the rows we feed.
    gguf_path = convert_hf_to_gguf(hf_dir, tmp_path_factory.mktemp("g") / "tiny-f32.gguf", "f32").path
    embed = load_file(str(hf_dir / "model.safetensors"))["model.embed_tokens.weight"].astype(np.float32)
    backend = LlamaCppBackend.load(gguf_path, n_ctx=128, n_threads=2, n_batch=32)
    yield backend, embed
    backend.close()


def _logits(backend, segments):
    backend.prefill(segments)
    return backend.logits()


def test_embedding_prefill_equals_token_prefill(tiny):
    backend, embed = tiny
    ids = backend.tokenize("The capital of France is Paris, and 1969 was a year.", add_special=True)
    by_tokens = _logits(backend, [TokenSegment(ids)])
    by_embeddings = _logits(backend, [EmbeddingSegment(embed[ids])])
    assert np.abs(by_tokens - by_embeddings).max() == 0.0


def test_mixed_segments_equal_token_prefill(tiny):
    backend, embed = tiny
    ids = backend.tokenize("Describe the picture: a red bicycle leaning on a wall.", add_special=True)
    by_tokens = _logits(backend, [TokenSegment(ids)])
    mixed = [TokenSegment(ids[:4]), EmbeddingSegment(embed[ids[4:9]]), TokenSegment(ids[9:])]
    assert np.abs(by_tokens - _logits(backend, mixed)).max() == 0.0


def test_prefill_longer_than_batch(tiny):
    backend, embed = tiny
    ids = (backend.tokenize("numbers 0 1 2 3 4 5 6 7 8 9 " * 8, add_special=True))[:90]
    assert len(ids) > backend.n_batch
    by_tokens = _logits(backend, [TokenSegment(ids)])
    assert np.abs(by_tokens - _logits(backend, [EmbeddingSegment(embed[ids])])).max() == 0.0


def test_prefix_reuse_gives_fresh_logits(tiny):
    backend, _ = tiny
    a = backend.tokenize("Shared prefix of a conversation, then turn one", add_special=True)
    b = backend.tokenize("Shared prefix of a conversation, then another turn entirely", add_special=True)
    backend.prefill([TokenSegment(a)])
    reused = _logits(backend, [TokenSegment(b)])  # keeps the common prefix in the KV cache
    backend.reset()
    fresh = _logits(backend, [TokenSegment(b)])
    assert np.abs(reused - fresh).max() < 1e-4


def test_greedy_stream_is_deterministic(tiny):
    backend, _ = tiny
    ids = backend.tokenize("Once upon a time", add_special=True)
    runs = []
    for _ in range(2):
        backend.prefill([TokenSegment(ids)])
        runs.append(list(backend.stream(SamplingParams(temperature=0.0), 12)))
    assert runs[0] == runs[1] and len(runs[0]) > 0
    # greedy: the first sampled token is the argmax of the prefill logits
    backend.prefill([TokenSegment(ids)])
    assert runs[0][0] == int(np.argmax(backend.logits()))


def test_prompt_longer_than_context(tiny):
    backend, _ = tiny
    with pytest.raises(ContextOverflowError, match=f"context holds {backend.n_ctx}"):
        backend.prefill([TokenSegment([5] * (backend.n_ctx + 10))])


def test_embedding_width_checked(tiny):
    backend, _ = tiny
    with pytest.raises(ValueError, match="embeddings must be"):
        backend.prefill([EmbeddingSegment(np.zeros((3, 7), np.float32))])


def test_truncated_gguf_is_refused(tiny_model, tmp_path):
    path = convert_hf_to_gguf(tiny_model("llama"), tmp_path / "t.gguf", "f16").path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="cannot load"):
        LlamaCppBackend.load(path, n_ctx=64)
