"""LLaVA-1.5 (CLIP) mmproj GGUF: keys and tensors, then llama.cpp's own libmtmd against torch.

The image handed to llama.cpp is already at the model's size, so both sides see the same pixels
(transformers' resize and center crop are the identity there; llama.cpp normalises with the
mean/std written to the mmproj).
"""

from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest
import torch
import transformers
from vision_models import build_tiny_llava_vision

from vishwamai_edge.errors import ExportError
from vishwamai_edge.export.gguf.mmproj import write_mmproj
from vishwamai_edge.runtime.backends.llamacpp import model_params

IMAGE_SIZE, PATCH = 30, 6
SIZES = {"image_size": IMAGE_SIZE, "patch_size": PATCH}
N_TOKENS = (IMAGE_SIZE // PATCH) ** 2
# max |diff| / max |torch|. Not 1e-4 for f32: ggml's CPU gelu and gelu_quick read an fp16 table.
REL_TOL = {"f32": 2e-3, "f16": 1e-2}
# llama.cpp's llava graph (models/llava.cpp, since the graph refactor #13321) concatenates the CLS
# row after the patches while clip.cpp still fills positions 0..N and picks rows 1..N, so each patch
# gets its neighbour's position embedding, patch 0 is dropped and CLS is fed to the LLM
# (ggml-org/llama.cpp issue #25814, fix in PR #25844). The one vendored by llama-cpp-python
# 0.3.36 has it. None: accept either behaviour.
CLS_ORDER_FIXED: bool | None = None


def _image(seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).random((IMAGE_SIZE, IMAGE_SIZE, 3)) * 255).astype(np.uint8)


def _torch_features(hf_dir, image: np.ndarray, cls_last: bool = False) -> np.ndarray:
    """transformers' `get_image_features` on `image`, or with `cls_last` the same weights run
    in the token order of this llama.cpp's llava graph (see CLS_ORDER_FIXED)."""
    model = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    pre = json.loads((hf_dir / "preprocessor_config.json").read_text())
    mean, std = np.array(pre["image_mean"], np.float32), np.array(pre["image_std"], np.float32)
    pixels = (image.astype(np.float32) / 255.0 - mean) / std
    pixel_values = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    cfg = model.config
    layers = cfg.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else layers
    with torch.no_grad():
        if not cls_last:
            out = model.model.get_image_features(
                pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy)
            return out.pooler_output[0].numpy()
        tower = model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)
        emb = tower.embeddings
        patches = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([patches, emb.class_embedding[None, None]], 1) + emb.position_embedding.weight[None]
        hidden = [tower.pre_layrnorm(x)]
        for layer in tower.encoder.layers:
            h = layer(hidden[-1], None)
            hidden.append(h[0] if isinstance(h, tuple) else h)
        picked = torch.cat([hidden[i][:, 1:] for i in layers], -1)  # rows 1..N: drops patch 0, keeps CLS
        return model.model.multi_modal_projector(picked)[0].numpy()


def _text_gguf(hf_dir, tokenizer_dir, out_dir):
    """The LLaVA language model as a plain Llama folder (with a tokenizer), converted to GGUF."""
    from vishwamai_edge.export.gguf import convert_hf_to_gguf

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    llava = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    text_cfg = llava.config.text_config
    text_cfg.vocab_size = len(tok)
    text_cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    llm = transformers.LlamaForCausalLM(text_cfg).eval()
    # same body as the LLaVA; embedding rows for the tokenizer's size are fresh random ones
    llm.model.load_state_dict(
        {k: v for k, v in llava.model.language_model.state_dict().items() if "embed_tokens" not in k},
        strict=False)
    folder = out_dir / "llm"
    llm.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    convert_hf_to_gguf(folder, out_dir / "llm.gguf", outtype="f32")
    return folder, out_dir / "llm.gguf"


class _Mtmd:
    """LLM GGUF + mmproj in llama-cpp-python's low-level libmtmd bindings."""

    def __init__(self, llm_gguf, mmproj):
        import llama_cpp
        from llama_cpp import mtmd_cpp as M

        self.L, self.M = llama_cpp, M
        llama_cpp.llama_backend_init()
        mp = model_params(llama_cpp)  # as the runtime loads it (AMX off on VMs where it crashes)
        mp.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(llm_gguf).encode(), mp)
        assert self.model
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 256, 256, 256, 2, 2
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        params = M.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 2, False, False
        self.mctx = M.mtmd_init_from_file(str(mmproj).encode(), self.model, params)
        assert self.mctx, "libmtmd refused the mmproj"

    def tokenize(self, prompt: str, image: np.ndarray):
        M = self.M
        data = (ctypes.c_uint8 * image.size).from_buffer_copy(np.ascontiguousarray(image).tobytes())
        bitmap = M.mtmd_bitmap_init(image.shape[1], image.shape[0], data)
        text = M.mtmd_input_text()
        raw = prompt.replace("<image>", M.mtmd_default_marker().decode()).encode()
        text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), False, True
        chunks = M.mtmd_input_chunks_init()
        bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert M.mtmd_tokenize(self.mctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        M.mtmd_bitmap_free(bitmap)
        return chunks

    def image_embeddings(self, image: np.ndarray) -> np.ndarray:
        M = self.M
        chunks = self.tokenize("<image>", image)
        try:
            for i in range(M.mtmd_input_chunks_size(chunks)):
                chunk = M.mtmd_input_chunks_get(chunks, i)
                if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n = M.mtmd_input_chunk_get_n_tokens(chunk)
                    assert M.mtmd_encode_chunk(self.mctx, chunk) == 0
                    n_embd = self.L.llama_model_n_embd(self.model)
                    return np.ctypeslib.as_array(M.mtmd_get_output_embd(self.mctx), shape=(n, n_embd)).copy()
        finally:
            M.mtmd_input_chunks_free(chunks)
        raise AssertionError("no image chunk")

    def greedy(self, prompt: str, image: np.ndarray, n: int) -> tuple[list[int], np.ndarray]:
        """Greedy tokens after the prompt, and the logits at the prompt's last position."""
        L, M = self.L, self.M
        chunks = self.tokenize(prompt, image)
        new_past = L.llama_pos(0)
        rc = M.mtmd_helper_eval_chunks(self.mctx, self.ctx, chunks, 0, 0, 256, True, ctypes.byref(new_past))
        assert rc == 0
        M.mtmd_input_chunks_free(chunks)
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        past, out, first = new_past.value, [], None
        for _ in range(n):
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(n_vocab,))
            first = logits.copy() if first is None else first
            tok = int(np.argmax(logits))
            out.append(tok)
            batch = L.llama_batch_get_one((L.llama_token * 1)(tok), 1)
            assert L.llama_decode(self.ctx, batch) == 0
            past += 1
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        return out, first

    def close(self):
        self.M.mtmd_free(self.mctx)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return build_tiny_llava_vision(tmp_path_factory.mktemp("llava-clip"), **SIZES)


def test_keys_and_tensors(llava, tmp_path):
    import gguf

    info = write_mmproj(llava, tmp_path / "mmproj.gguf")
    r = gguf.GGUFReader(info.path)
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["general.architecture"] == "clip"
    assert kv["clip.projector_type"] == "mlp" and kv["clip.has_vision_encoder"]
    # vision_feature_layer -2 of 3 blocks = hidden_states[2]: two blocks run, the third is dropped
    assert kv["clip.vision.block_count"] == 2 and kv["clip.vision.feature_layer"] == [2]
    assert info.feature_layers == [2] and info.n_image_tokens == N_TOKENS
    assert kv["clip.vision.image_size"] == IMAGE_SIZE and kv["clip.vision.patch_size"] == PATCH
    assert kv["clip.use_gelu"] is False  # CLIP's quick_gelu
    names = {t.name for t in r.tensors}
    assert {"v.patch_embd.weight", "v.class_embd", "v.position_embd.weight", "v.pre_ln.weight",
            "mm.0.weight", "mm.2.bias", "v.blk.1.ffn_up.weight"} <= names
    assert "v.blk.2.attn_q.weight" not in names and not any("post_ln" in n for n in names)


def test_rejects_siglip_and_full_strategy(tmp_path):
    siglip = build_tiny_llava_vision(tmp_path / "siglip", tower="siglip", **SIZES)
    with pytest.raises(ExportError, match="only CLIP"):
        write_mmproj(siglip, tmp_path / "a.gguf")
    full = build_tiny_llava_vision(tmp_path / "full", select_strategy="full", **SIZES)
    with pytest.raises(ExportError, match="full"):
        write_mmproj(full, tmp_path / "b.gguf")


@pytest.mark.parametrize("dtype,feature_layer", [("f32", -2), ("f16", -2), ("f32", [1, 3])])
def test_image_embeddings_match_torch(tmp_path, tokenizer_dirs, dtype, feature_layer):
    import llama_cpp.mtmd_cpp  # noqa: F401  (built with llama-cpp-python: a missing one is a broken install)
    hf = build_tiny_llava_vision(tmp_path / "llava", image_size=IMAGE_SIZE, patch_size=PATCH,
                                 vision_feature_layer=feature_layer)
    _, llm_gguf = _text_gguf(hf, tokenizer_dirs["llama3"], tmp_path)
    info = write_mmproj(hf, tmp_path / "mmproj.gguf", dtype=dtype)
    image = _image()
    mt = _Mtmd(llm_gguf, info.path)
    try:
        got = mt.image_embeddings(image)
    finally:
        mt.close()
    rel = {}
    for layout in ("hf", "cls_last"):
        ref = _torch_features(hf, image, cls_last=layout == "cls_last")
        assert got.shape == ref.shape == (N_TOKENS, 64)
        rel[layout] = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"{dtype} feature_layer={feature_layer}: max|diff|/max|torch| {rel}")
    # A llama.cpp with the CLS-order fix matches transformers; the vendored one matches the
    # CLS-last emulation. Either way every key and tensor of the mmproj was read as meant.
    assert min(rel.values()) < REL_TOL[dtype], rel
    if CLS_ORDER_FIXED is not None:
        assert (rel["hf"] < REL_TOL[dtype]) == CLS_ORDER_FIXED, rel


def test_greedy_tokens_match_our_embedding_path(tmp_path, tokenizer_dirs):
    """libmtmd end to end (mtmd_helper_eval_chunks) vs our backend prefilled with torch's image
    features as an EmbeddingSegment, in the token layout this llama.cpp computes."""
    import llama_cpp.mtmd_cpp  # noqa: F401  (built with llama-cpp-python: a missing one is a broken install)

    from vishwamai_edge.runtime.backends import EmbeddingSegment, SamplingParams, TokenSegment
    from vishwamai_edge.runtime.backends.llamacpp import LlamaCppBackend

    hf = build_tiny_llava_vision(tmp_path / "llava", image_size=IMAGE_SIZE, patch_size=PATCH)
    _, llm_gguf = _text_gguf(hf, tokenizer_dirs["llama3"], tmp_path)
    info = write_mmproj(hf, tmp_path / "mmproj.gguf")
    image, before, after, n = _image(2), "look: ", " what is it?", 12
    mt = _Mtmd(llm_gguf, info.path)
    try:
        theirs, their_logits = mt.greedy(before + "<image>" + after, image, n)
        _, other_logits = mt.greedy(before + "<image>" + after, _image(3), n)
        rows = mt.image_embeddings(image)
    finally:
        mt.close()
    refs = {layout: _torch_features(hf, image, cls_last=layout) for layout in (False, True)}
    features = min(refs.values(), key=lambda r: np.abs(rows - r).max())
    backend = LlamaCppBackend.load(llm_gguf, n_ctx=256, n_threads=2, n_gpu_layers=0)
    try:
        backend.prefill([TokenSegment(backend.tokenize(before)), EmbeddingSegment(features),
                         TokenSegment(backend.tokenize(after))])
        our_logits = backend.logits()
        ours = list(backend.stream(SamplingParams(temperature=0.0), n))
    finally:
        backend.close()
    diff = np.abs(our_logits - their_logits).max()
    image_effect = np.abs(other_logits - their_logits).max()
    print("mtmd", theirs, "ours", ours, 
          f"logits max|diff| {diff:.3g}, another image moves them {image_effect:.3g}")
    assert diff < 1e-2 * image_effect, (diff, image_effect)
    # ours stops early only at an end-of-generation token
    assert ours == theirs[:len(ours)] and len(ours) >= 4
