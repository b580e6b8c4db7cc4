"""The TensorRT-LLM backend up to the call into the engine: the prompt table, the missing-package
error, and the arguments a (fake) tensorrt_llm runner receives."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import tiny_models

from vishwamai_edge.errors import ContextOverflowError, InputError, MissingDependencyError, UserError
from vishwamai_edge.runtime.backends import Cancelled, EmbeddingSegment, SamplingParams, TokenSegment
from vishwamai_edge.runtime.backends.trtllm import TrtLlmBackend, prompt_table

HIDDEN = 8


def test_prompt_table_gives_rows_fake_ids_in_order():
    a = np.arange(3 * HIDDEN, dtype=np.float32).reshape(3, HIDDEN)
    b = -np.arange(2 * HIDDEN, dtype=np.float32).reshape(2, HIDDEN)
    segs = [TokenSegment([1, 2]), EmbeddingSegment(a), TokenSegment([7]), EmbeddingSegment(b), TokenSegment([3])]
    ids, table = prompt_table(segs, vocab_size=100)
    assert ids == [1, 2, 100, 101, 102, 7, 103, 104, 3]
    assert table.dtype == np.float16 and table.shape == (5, HIDDEN)
    np.testing.assert_array_equal(table, np.concatenate([a, b]).astype(np.float16))


def test_prompt_table_text_only_and_errors():
    assert prompt_table([TokenSegment([5, 6])], 10) == ([5, 6], None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        prompt_table([TokenSegment([10])], 10)  # would address the prompt table
    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        prompt_table([EmbeddingSegment(np.zeros((2, 8))), EmbeddingSegment(np.zeros((2, 4)))], 10)
    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        prompt_table([EmbeddingSegment(np.zeros((2, 4)))], 10, hidden=8)
    with pytest.raises(ValueError, match=r"\(n, hidden\)"):
        prompt_table([EmbeddingSegment(np.zeros(8))], 10)
    with pytest.raises(ValueError, match="float16"):
        prompt_table([EmbeddingSegment(np.full((1, 8), 1e6))], 10)


def test_load_without_tensorrt_llm_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import fails as if it were not installed
    with pytest.raises(MissingDependencyError) as err:
        TrtLlmBackend.load(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "tensorrt_llm is not installed" in message
    assert "WITH_TRTLLM=1" in message and "pypi.nvidia.com" in message


class FakeRunner:
    """Stands in for ModelRunnerCpp: records from_dir's and generate's arguments and streams a
    scripted reply the way TensorRT-LLM does (output_ids = prompt + tokens so far)."""

    calls: list = []
    reply: list[int] = []

    @classmethod
    def from_dir(cls, **kwargs):
        cls.calls.append(("from_dir", kwargs))
        return cls()

    def generate(self, **kwargs):
        FakeRunner.calls.append(("generate", kwargs))
        ids = list(np.asarray(kwargs["batch_input_ids"][0]))
        return self._stream(ids)

    def _stream(self, ids):
        for k in range(1, len(FakeRunner.reply) + 1):
            out = ids + FakeRunner.reply[:k] + [0] * 3  # padded past the sequence length
            yield {"output_ids": np.array([[out]]), "sequence_lengths": np.array([[len(ids) + k]])}


def _fake_modules(monkeypatch):
    trt = types.ModuleType("tensorrt_llm")
    trt.runtime = types.SimpleNamespace(ModelRunnerCpp=FakeRunner)
    torch = types.ModuleType("torch")
    torch.int32 = np.int32
    torch.tensor = lambda data, dtype: np.asarray(data, dtype=dtype)
    torch.from_numpy = lambda a: a
    torch.cuda = types.SimpleNamespace(is_available=lambda: False)
    monkeypatch.setitem(sys.modules, "tensorrt_llm", trt)
    monkeypatch.setitem(sys.modules, "torch", torch)
    FakeRunner.calls = []


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-bundle")
    tok_dir = tiny_models.train_bpe_tokenizer(root, "qwen2")
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    n_vocab = 1 + max([*spec["model"]["vocab"].values(), *(t["id"] for t in spec["added_tokens"])])
    engine = root / "engine"
    engine.mkdir()
    (engine / "rank0.engine").write_bytes(b"\0" * 1000)
    (engine / "config.json").write_text(json.dumps({
        "pretrained_config": {"architecture": "Qwen2ForCausalLM", "dtype": "float16", "hidden_size": HIDDEN,
                              "vocab_size": n_vocab},
        "build_config": {"max_seq_len": 96, "max_input_len": 95, "max_prompt_embedding_table_size": 6},
    }))
    (root / "plan.json").write_text(json.dumps({"kv_cache_free_gpu_mem_fraction": 0.25, "kv_cache_budget_gb": 0.5}))
    return engine, n_vocab


def test_backend_calls_the_runner_with_prompt_table_and_ids(monkeypatch, bundle):
    _fake_modules(monkeypatch)
    engine, n_vocab = bundle
    llm = TrtLlmBackend.load(engine / "rank0.engine", n_ctx=4096)
    assert FakeRunner.calls == [("from_dir", {"engine_dir": str(engine), "rank": 0, "max_batch_size": 1,
                                               "max_beam_width": 1, "kv_cache_free_gpu_mem_fraction": 0.25})]
    assert (llm.n_ctx, llm.n_embd, llm.n_vocab) == (96, HIDDEN, n_vocab)  # capped at the engine's max_seq_len

    text = llm.tokenize("hello world")
    eos = llm.special_token("eos")
    assert eos is not None and eos[1] == "<|im_end|>" and llm.is_eog(eos[0])
    assert b"".join(llm.token_bytes(t) for t in text) == b"hello world"
    image = np.linspace(-1, 1, 4 * HIDDEN, dtype=np.float32).reshape(4, HIDDEN)
    llm.prefill([TokenSegment(text[:1]), EmbeddingSegment(image), TokenSegment(text[1:])])

    reply = llm.tokenize(" the")
    FakeRunner.reply = reply + [eos[0], 5]
    got = list(llm.stream(SamplingParams(), max_tokens=20))
    assert got == reply  # stops at the end-of-turn token, never shows it

    name, kw = FakeRunner.calls[-1]
    assert name == "generate"
    expected_ids = text[:1] + [n_vocab, n_vocab + 1, n_vocab + 2, n_vocab + 3] + text[1:]
    assert kw["batch_input_ids"][0].dtype == np.int32 and kw["batch_input_ids"][0].tolist() == expected_ids
    assert kw["prompt_table"].shape == (1, 4, HIDDEN) and kw["prompt_table"].dtype == np.float16
    np.testing.assert_array_equal(kw["prompt_table"][0], image.astype(np.float16))
    assert kw["prompt_tasks"] == "0"
    assert {k: kw[k] for k in ("max_new_tokens", "end_id", "pad_id", "streaming", "temperature", "top_k", "top_p",
                               "return_dict", "output_sequence_lengths")} == {
        "max_new_tokens": 20, "end_id": eos[0], "pad_id": llm.tokenize("<|endoftext|>")[0], "streaming": True,
        "temperature": 1.0, "top_k": 1, "top_p": 0.0, "return_dict": True, "output_sequence_lengths": True}
    assert "repetition_penalty" not in kw  # penalties off: not sent
    assert llm.n_past == len(expected_ids) + len(reply)
    assert llm.memory().model_bytes == 1000 and llm.memory().context_bytes == 500_000_000


def test_backend_sampling_text_only_and_limits(monkeypatch, bundle):
    _fake_modules(monkeypatch)
    engine, _ = bundle
    llm = TrtLlmBackend.load(engine, n_ctx=64)
    ids = llm.tokenize("hello")
    llm.prefill([TokenSegment(ids)])
    FakeRunner.reply = llm.tokenize(" world hello world")
    sampling = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=3, repeat_penalty=1.1)
    assert list(llm.stream(sampling, max_tokens=2)) == FakeRunner.reply[:2]
    kw = FakeRunner.calls[-1][1]
    assert "prompt_table" not in kw and "prompt_tasks" not in kw
    assert (kw["temperature"], kw["top_k"], kw["top_p"], kw["random_seed"], kw["repetition_penalty"]) == (
        0.7, 20, 0.9, 3, 1.1)
    assert kw["max_new_tokens"] == 2
    with pytest.raises(ContextOverflowError):
        llm.prefill([TokenSegment(ids * 64)])
    with pytest.raises(InputError, match="prompt table holds 6"):
        llm.prefill([EmbeddingSegment(np.zeros((7, HIDDEN), np.float32))])
    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        llm.prefill([EmbeddingSegment(np.zeros((2, 3), np.float32))])
    with pytest.raises(Cancelled):
        llm.prefill([TokenSegment(ids)], abort=lambda: True)
    with pytest.raises(UserError, match="gather_generation_logits"):
        llm.logits()
