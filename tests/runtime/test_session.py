"""Session pieces that need no model: detokenization and stop strings."""

from __future__ import annotations

from vishwamai_edge.runtime.session import Detokenizer, _split_stop


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
    detok = Detokenizer(BytePieces([raw[:4], raw[4:5]]))
    assert detok.push(0) == "ok " and detok.push(1) == ""
    assert detok.flush() == ""


def test_stop_strings_hold_back_prefixes():
    assert _split_stop("Hello wor", ["world"]) == ("Hello ", "wor", False)
    assert _split_stop("Hello world!", ["world"]) == ("Hello ", "", True)
    assert _split_stop("abc", []) == ("abc", "", False)
    assert _split_stop("say </s", ["</s>", "STOP"]) == ("say ", "</s", False)
