"""The llama.cpp backend on a tiny random model: embedding prefill, prefix reuse, limits."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from vishwamai_edge.errors import BundleError, ContextOverflowError
from vishwamai_edge.export.gguf import convert_hf_to_gguf
from vishwamai_edge.runtime.backends import EmbeddingSegment, SamplingParams, TokenSegment
from vishwamai_edge.runtime.backends.llamacpp import LlamaCppBackend, model_params


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


def test_amx_kernels_only_on_request(monkeypatch):
    """A build with AMX keeps its weights out of the AMX buffers unless asked (they crash some VMs)."""
    import llama_cpp

    amx = b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()
    monkeypatch.delenv("VISHWAMAI_EDGE_LLAMA_AMX", raising=False)
    assert model_params(llama_cpp).use_extra_bufts is not amx
    monkeypatch.setenv("VISHWAMAI_EDGE_LLAMA_AMX", "1")
    assert model_params(llama_cpp).use_extra_bufts is True


def test_truncated_gguf_is_refused(tiny_model, tmp_path):
    path = convert_hf_to_gguf(tiny_model("llama"), tmp_path / "t.gguf", "f16").path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="cannot load"):
        LlamaCppBackend.load(path, n_ctx=64)


def test_abort_stops_a_prefill_and_keeps_only_the_shared_prefix(tiny):
    from vishwamai_edge.runtime.backends import Cancelled

    backend, _ = tiny
    ids = backend.tokenize("The capital of France is Paris, and 1969 was a year. " * 3, add_special=True)
    backend.prefill([TokenSegment(ids[:10])])
    polls = []

    def abort() -> bool:  # say stop on the third poll: inside the first or second batch
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(Cancelled):
        backend.prefill([TokenSegment(ids[:10] + ids[10:])], abort=abort)
    assert backend.n_past == 10  # the shared prefix only: the batches evaluated before the abort are dropped
    # the next prefill evaluates the rest and gives the same logits as a fresh one
    again = _logits(backend, [TokenSegment(ids)])
    backend.reset()
    assert np.abs(again - _logits(backend, [TokenSegment(ids)])).max() < 1e-4


def _penalised(logits: np.ndarray, history: list[int], s: SamplingParams) -> np.ndarray:
    """llama.cpp's penalties, written from their definition: repeat divides a positive logit and
    multiplies a negative one; frequency subtracts count x value; presence subtracts the value once."""
    out = logits.astype(np.float64).copy()
    counts = np.bincount(history[-s.penalty_last_n:], minlength=len(out))
    seen = counts > 0
    out[seen] = np.where(out[seen] > 0, out[seen] / s.repeat_penalty, out[seen] * s.repeat_penalty)
    return out - counts * s.frequency_penalty - seen * s.presence_penalty


PENALTIES = [
    dict(repeat_penalty=1.8),
    dict(frequency_penalty=1.5),
    dict(presence_penalty=2.0),
    dict(repeat_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5, penalty_last_n=8),
]


@pytest.fixture(scope="module")
def repetitive_prompt(tiny) -> list[int]:
    """A prompt followed by the model's own greedy continuation: its favourite tokens are in the history."""
    backend, _ = tiny
    ids = backend.tokenize("Paris is the capital of France. Paris is", add_special=True)
    backend.reset()
    backend.prefill([TokenSegment(ids)])
    return ids + list(backend.stream(SamplingParams(temperature=0.0), 12))


def _greedy_after(backend, ids: list[int], s: SamplingParams) -> tuple[int, np.ndarray]:
    backend.reset()
    backend.prefill([TokenSegment(ids)])
    logits = backend.logits()
    return next(iter(backend.stream(s, 1))), logits


@pytest.mark.parametrize("params", PENALTIES)
def test_penalties_are_applied_as_defined(tiny, repetitive_prompt, params):
    backend, _ = tiny
    s = SamplingParams(temperature=0.0, **params)
    got, logits = _greedy_after(backend, repetitive_prompt, s)
    assert got == int(np.argmax(_penalised(logits, repetitive_prompt, s)))


def test_the_penalties_move_the_greedy_token(tiny, repetitive_prompt):
    # the test above must be able to fail: on this prompt the penalties really change the choice
    backend, _ = tiny
    plain, logits = _greedy_after(backend, repetitive_prompt, SamplingParams(temperature=0.0))
    assert plain == int(np.argmax(logits))
    moved = [p for p in PENALTIES if _greedy_after(backend, repetitive_prompt, SamplingParams(**p))[0] != plain]
    assert len(moved) >= 2, moved


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(repeat_penalty=0), "repeat_penalty"), (dict(frequency_penalty=3), "frequency_penalty"),
    (dict(presence_penalty=-2.5), "presence_penalty"), (dict(min_p=2), "min_p"), (dict(top_k=-1), "top_k"),
])
def test_sampling_params_refuse_out_of_range_values(bad, message):
    from vishwamai_edge.errors import InputError

    with pytest.raises(InputError, match=message):
        SamplingParams(**bad)


def test_tiny_context_is_refused_not_aborted(tiny):
    from vishwamai_edge.errors import InputError

    backend, _ = tiny
    with pytest.raises(InputError, match="at least 64"):
        LlamaCppBackend.load(backend.path, n_ctx=10)
    small = LlamaCppBackend.load(backend.path, n_ctx=64, n_threads=1)  # n_batch shrinks to fit
    try:
        small.prefill([TokenSegment(small.tokenize("hello world", add_special=True))])
        assert next(iter(small.stream(SamplingParams(), 1))) >= 0
    finally:
        small.close()
