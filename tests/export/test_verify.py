"""The GGUF check against torch: its tokenizer agreement covers the rendered chat template."""

from __future__ import annotations

import gguf

from tiny_models import GEMMA_TURN_MARKERS
from vishwamai_edge.errors import quiet_transformers
from vishwamai_edge.export.gguf import convert_hf_to_gguf
from vishwamai_edge.export.verify import CHAT_CHECK_MESSAGES, TorchReference, check_gguf, chat_check_prompt
from vishwamai_edge.recipe import DEFAULT_VERIFY_PROMPTS


def test_chat_prompt_rendered_by_the_template(tiny_variant):
    tok = quiet_transformers().AutoTokenizer.from_pretrained(tiny_variant("gemma-chat"))
    chat = chat_check_prompt(tok)
    assert chat.startswith("<bos><start_of_turn>user\n") and chat.endswith("<start_of_turn>model\n")
    assert all(m["content"] in chat for m in CHAT_CHECK_MESSAGES)


def test_tokenizer_check_sees_chat_markers(tiny_variant, tmp_path, monkeypatch):
    """Chat markers written as NORMAL tokens are spelled out by llama.cpp; no plain prompt shows it."""
    hf_dir = tiny_variant("gemma-chat")
    reference = TorchReference(hf_dir)
    marker_ids = set(reference.tokenizer.convert_tokens_to_ids(GEMMA_TURN_MARKERS))
    write_types = gguf.GGUFWriter.add_token_types

    def markers_normal(self, types):
        write_types(self, [gguf.TokenType.NORMAL if i in marker_ids else t for i, t in enumerate(types)])

    monkeypatch.setattr(gguf.GGUFWriter, "add_token_types", markers_normal)
    out = convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf", "f16")
    check = check_gguf(reference, out.path, DEFAULT_VERIFY_PROMPTS, n_threads=2)
    assert check.tokenizer_agreement == len(DEFAULT_VERIFY_PROMPTS) / (len(DEFAULT_VERIFY_PROMPTS) + 1), check
    assert check.top1_agreement == 1.0, check  # the logits check itself is unaffected
