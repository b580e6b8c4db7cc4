import pytest
from profile_fixtures import write_tiny_gguf

from vishwamai_edge.errors import BundleError
from vishwamai_edge.profile.gguf_meta import model_shape, read_gguf_kv
from vishwamai_edge.profile.roofline import bytes_per_token, roofline_ratio


def test_shape_from_header(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", n_layer=4, n_embd=64, n_head=8, n_head_kv=2, n_ctx=256)
    shape = model_shape(path)
    assert (shape.arch, shape.n_layer, shape.n_embd, shape.n_head, shape.n_head_kv) == ("llama", 4, 64, 8, 2)
    assert (shape.head_dim_k, shape.head_dim_v, shape.n_ctx_train) == (8, 8, 256)
    assert shape.file_bytes == path.stat().st_size
    # K and V, 4 layers x 2 KV heads x 8 dims, f16
    assert shape.kv_bytes_per_position() == 2 * 4 * 2 * 8 * 2
    kv = read_gguf_kv(path)
    assert kv["tokenizer.ggml.tokens"] == {"array_of": 8, "length": 300}


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(BundleError, match="bad magic"):
        model_shape(bad)
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(BundleError, match="cannot read the GGUF header"):
        model_shape(short)


def test_roofline_arithmetic(tmp_path):
    shape = model_shape(write_tiny_gguf(tmp_path / "m.gguf"))
    per_pos = shape.kv_bytes_per_position()
    assert bytes_per_token(shape, 100) == shape.file_bytes + 100 * per_pos
    # 50 tokens/s reading (file + 100 positions of KV) each, against 1 GB/s
    expected = 50 * (shape.file_bytes + 100 * per_pos) / 1e9
    assert roofline_ratio(50.0, shape, 100, 1.0) == pytest.approx(expected)
