"""Run logic on a scripted backend: exact token counts, the KV reset, going on past an early end."""

from __future__ import annotations

import numpy as np

from vishwamai_edge.profile.measure import prompt_ids, run_prompt
from vishwamai_edge.runtime.backends import TokenSegment

EOG = 2


class ScriptedBackend:
    """Streams `stream_tokens` then stops as if the model chose end-of-generation."""

    n_ctx = 4096
    n_vocab = 10

    def __init__(self, stream_tokens: int):
        self.stream_tokens = stream_tokens
        self.prefills: list[list[int]] = []
        self.resets = 0

    def reset(self):
        self.resets += 1

    def prefill(self, segments):
        (seg,) = segments
        assert isinstance(seg, TokenSegment)
        self.prefills.append(list(seg.tokens))

    def stream(self, sampling, max_tokens):
        for i in range(min(self.stream_tokens, max_tokens)):
            yield 5 + i % 3

    def logits(self):
        x = np.zeros(self.n_vocab, dtype=np.float32)
        x[EOG] = 10.0  # the model insists on ending
        x[7] = 5.0
        return x

    def is_eog(self, tok):
        return tok == EOG

    def special_token(self, kind):
        return (1, "<s>") if kind == "bos" else None

    def tokenize(self, text, add_special=False, parse_special=True):
        return [3, 4, 5, 6]


def test_prompt_ids_exact_length_with_bos():
    llm = ScriptedBackend(0)
    for n in (1, 2, 5, 512):
        ids = prompt_ids(llm, n)
        assert len(ids) == n and ids[0] == 1
    assert prompt_ids(llm, 6) == [1, 3, 4, 5, 6, 3]


def test_full_stream():
    llm = ScriptedBackend(stream_tokens=100)
    r = run_prompt(llm, [1, 3, 4], 8)
    assert (r.prompt_tokens, r.decode_tokens, r.forced_tokens) == (3, 8, 0)
    assert llm.resets == 1  # every run starts from an empty KV cache
    assert llm.prefills[0] == [1, 3, 4]
    assert r.ttft_s >= r.prefill_s > 0 and r.decode_s > 0
    assert r.context_mean == 3 + 4


def test_goes_on_past_an_early_end():
    llm = ScriptedBackend(stream_tokens=3)
    r = run_prompt(llm, [1, 3, 4], 8)
    assert (r.decode_tokens, r.forced_tokens) == (8, 5)
    # each forced step appends the best token that is not end-of-generation and evaluates it
    assert llm.prefills[-1] == [1, 3, 4, 5, 6, 7, 7, 7, 7, 7, 7]
    assert len(llm.prefills) == 1 + 5
