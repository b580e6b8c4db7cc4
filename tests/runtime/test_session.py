"""Session pieces that need no model: detokenization and stop strings."""

from __future__ import annotations

from vishwamai_edge.runtime.reply import Detokenizer, split_stop


class BytePieces:
    """Token i is the i-th byte string: enough of the backend for the detokenizer."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def token_bytes(self, token: int) -> bytes:
        return self.pieces[token]


def test_multibyte_character_split_across_tokens():
    text = "東京 🙂 café"
    raw = text.encode()
    pieces = [raw[i : i + 1] for i in range(len(raw))]  # worst case: one byte per token
    detok = Detokenizer(BytePieces(pieces))
    out = [detok.push(i) for i in range(len(pieces))]
    assert "".join(out) == text
    assert all("\ufffd" not in piece for piece in out)
    assert out[0] == "" and out[2] == "東"  # held back until the third byte arrives


def test_cut_off_character_is_dropped():
    raw = "ok 東".encode()
    detok = Detokenizer(BytePieces([raw[:4], raw[4:5], "é".encode()]))
    assert detok.push(0) == "ok " and detok.push(1) == ""  # two of 東's three bytes: held back
    detok.flush()  # the reply ends there: the partial character is dropped, not shown as U+FFFD...
    assert detok.push(2) == "é"  # ...and does not corrupt what the next reply decodes


def test_stop_strings_hold_back_prefixes():
    assert split_stop("Hello wor", ["world"]) == ("Hello ", "wor", False)
    assert split_stop("Hello world!", ["world"]) == ("Hello ", "", True)
    assert split_stop("abc", []) == ("abc", "", False)
    assert split_stop("say </s", ["</s>", "STOP"]) == ("say ", "</s", False)


def test_the_earliest_stop_wins_whatever_the_list_order():
    assert split_stop("xAyB", ["B", "A"]) == ("x", "", True)
    assert split_stop("xAyB", ["A", "B"]) == ("x", "", True)
    assert split_stop("one. two! three", ["!", "."]) == ("one", "", True)


def test_one_definition_of_decode_speed():
    from vishwamai_edge.runtime.generation_stats import GenerationStats, decode_tokens_per_s

    # 11 tokens, the first at t=0 and the last at t=1 s: 10 decode steps in 1 s
    assert decode_tokens_per_s(11, 1.0) == 10.0
    assert GenerationStats(completion_tokens=11, decode_s=1.0).decode_tokens_per_s == 10.0
    assert decode_tokens_per_s(1, 0.0) == 0.0
    from vishwamai_edge.profile.measure import RunTimings
    from vishwamai_edge.profile.report import DECODE_RATE_DEFINITION

    run = RunTimings(prompt_tokens=5, decode_tokens=11, tokenize_s=0, encode_s=0, prefill_s=0.1,
                     first_token_s=0, ttft_s=0.1, decode_s=1.0)
    assert run.decode_tps == 10.0  # the profile reports the same number as chat, ui and serve
    assert "(generated tokens - 1)" in DECODE_RATE_DEFINITION
