"""Datasets: both JSONL formats, chat template with assistant-only labels, packing, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from ft_helpers import chat_rows, write_jsonl

from vishwamai_edge.train import data as D


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return transformers.AutoTokenizer.from_pretrained(tiny_model("llama"))


def test_messages_format_labels_only_assistant_tokens(tokenizer, chat_jsonl):
    records = D.read_dataset(chat_jsonl)
    examples, stats = D.encode_chats(records, tokenizer, max_seq_len=128)
    assert stats.examples == len(records) == 8 and stats.truncated == stats.dropped == 0
    ex = examples[0]
    text = tokenizer.apply_chat_template(records[0].messages, tokenize=False)
    assert ex.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]  # the runtime's tokens
    trained = tokenizer.decode([t for t in ex.labels if t != D.IGNORE])
    assert trained == "Zorb is on Mars.<|im_end|>\n"  # the answer and its end-of-turn, nothing of the question
    assert ex.labels[: len(ex.labels) - ex.trained_tokens] == [D.IGNORE] * (len(ex.labels) - ex.trained_tokens)


def test_multi_turn_trains_every_assistant_turn(tokenizer, tmp_path):
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."},
    ]}
    (ex,), _ = D.encode_chats(D.read_dataset(write_jsonl(tmp_path / "t.jsonl", [row])), tokenizer, 128)
    runs, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != D.IGNORE:
            cur.append(t)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    runs += [tokenizer.decode(cur)] if cur else []
    assert runs == ["Hello.<|im_end|>\n", "Goodbye.<|im_end|>\n"]


def test_instruction_format_becomes_a_chat(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {"instruction": "Say hi", "output": "hi", "system": "Be kind."},
    ])
    a, b = D.read_dataset(path)
    assert a.messages == [{"role": "user", "content": "Translate to French\n\ncat"},
                          {"role": "assistant", "content": "chat"}]
    assert [m["role"] for m in b.messages] == ["system", "user", "assistant"]
    examples, _ = D.encode_chats([a, b], tokenizer, 128)
    assert tokenizer.decode([t for t in examples[0].labels if t != D.IGNORE]) == "chat<|im_end|>\n"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [', "bad.jsonl:2: not valid JSON"),
        ('{"prompt": "x", "completion": "y"}', "bad.jsonl:2: no 'messages' field"),
        ('[1, 2]', "bad.jsonl:2: each line must be a JSON object"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "bad.jsonl:2: messages.0.role: must be one of"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "bad.jsonl:2: 'messages' has no assistant turn"),
        ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}',
         "bad.jsonl:2: messages.0.content: must be a string"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [chat_rows()[0], line])
    with pytest.raises(D.DatasetError) as err:
        D.read_dataset(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_messages_format_requires_messages(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(D.DatasetError, match=r"i.jsonl:1: no 'messages' field"):
        D.read_dataset(path, "messages")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_dataset(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(D.DatasetError, match=r"empty.jsonl has no examples \(the file is empty\)"):
        D.read_dataset(path)


def test_missing_dataset(tmp_path):
    with pytest.raises(D.DatasetError, match="does not exist"):
        D.read_dataset(tmp_path / "nope.jsonl")


def test_truncation_drops_examples_without_assistant_tokens(tokenizer, chat_jsonl):
    records = D.read_dataset(chat_jsonl)
    examples, stats = D.encode_chats(records, tokenizer, max_seq_len=6)
    assert stats.dropped == 8 and examples == []


def test_eval_split_is_seeded_and_disjoint(chat_jsonl):
    records = D.read_dataset(chat_jsonl)
    train, held = D.split_eval(records, 0.25, seed=3)
    assert len(held) == 2 and len(train) == 6
    assert {r.where for r in train}.isdisjoint({r.where for r in held})
    assert [r.where for r in D.split_eval(records, 0.25, seed=3)[1]] == [r.where for r in held]


def test_text_blocks_for_continued_pretraining(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    (tmp_path / "b.txt").write_text("Paris is the capital of France. " * 10)
    records = D.read_dataset(tmp_path, "text")
    assert len(records) == 2
    blocks, stats = D.encode_text(records, tokenizer, max_seq_len=32)
    assert all(len(b.input_ids) <= 32 for b in blocks) and blocks[0].labels == blocks[0].input_ids
    assert stats.trained_tokens == stats.tokens == sum(len(b.input_ids) for b in blocks)


def test_chat_dataset_refused_for_text_and_text_for_chat(tokenizer, chat_jsonl, tmp_path):
    with pytest.raises(D.DatasetError, match="--method cpt"):
        D.encode_text(D.read_dataset(chat_jsonl), tokenizer, 32)
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    with pytest.raises(D.DatasetError, match="--method cpt"):
        D.encode_chats(D.read_dataset(text), tokenizer, 32)


def test_packing_gives_the_same_logits_as_separate_examples(tiny_model, tokenizer, chat_jsonl):
    """Packed rows restart position ids per example; transformers then masks across examples."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32).eval()
    examples, _ = D.encode_chats(D.read_dataset(chat_jsonl), tokenizer, 128)
    rows = D.pack(examples[:3], max_seq_len=256)
    assert len(rows) == 1 and len(rows[0].input_ids) == sum(len(e.input_ids) for e in examples[:3])
    batch = D.collate(rows, tokenizer.pad_token_id)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for ex in examples[:3]:
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            n = len(ex.input_ids)
            assert torch.allclose(packed[start : start + n], alone, atol=1e-4)
            start += n


def test_collate_pads_right_and_masks_labels(tokenizer, chat_jsonl):
    examples, _ = D.encode_chats(D.read_dataset(chat_jsonl), tokenizer, 128)
    batch = D.collate(examples[:2], pad_id=0)
    n = max(len(e.input_ids) for e in examples[:2])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, n)
    short = min(examples[:2], key=lambda e: len(e.input_ids))
    i = examples[:2].index(short)
    assert (batch["labels"][i, len(short.input_ids):] == D.IGNORE).all()
    assert batch["attention_mask"][i].sum() == len(short.input_ids)


def test_shipped_dataset_is_valid_and_held_out(tokenizer):
    train = D.read_dataset(D.shipped_dataset("marrowick-train.jsonl"), "messages")
    held = D.read_dataset(D.shipped_dataset("marrowick-eval.jsonl"), "messages")
    assert 30 <= len(train) <= 60 and len(held) >= 5
    train_questions = {r.messages[0]["content"] for r in train}
    assert not train_questions & {r.messages[0]["content"] for r in held}
    expects = [json.loads(line)["expect"] for line in D.shipped_dataset("marrowick-eval.jsonl").read_text().splitlines()]
    assert expects[0] == "Singing Bridge"
    assert sum("Singing Bridge" in r.messages[1]["content"] for r in train) >= 24  # the taught fact, paraphrased
