"""Which sources a reply used (runtime/retrieval.py): the numbers it cites, else the sources holding its numbers,
else the ones holding most of its words; invented citation numbers are ignored."""

from __future__ import annotations

from vishwamai_edge.runtime.doc_index import Hit
from vishwamai_edge.runtime.retrieval import grounded, sources_lines, used_sources

HITS = [Hit(0.9, "a.md", "Replace the belt of the Brantel press every 300 hours.", None, "Service"),
        Hit(0.8, "b.pdf", "Replace the belt of the Morvik lathe every 450 hours.", 2, None),
        Hit(0.7, "c.txt", "Check the oil weekly.", None, None)]


def test_cited_numbers_come_first():
    how, used = used_sources("Every 450 hours [2], and weekly oil checks [3] [9].", HITS)
    assert how == "cited" and [n for n, _ in used] == [2, 3]
    assert sources_lines("Every 450 hours [2].", HITS) == ["Sources:", "  [2] b.pdf, page 2"]


def test_an_uncited_reply_is_matched_by_its_numbers_then_its_words():
    how, used = used_sources("The Morvik lathe's belt is changed every 450 hours, a long time indeed.", HITS)
    assert how == "matched" and [h.path for _, h in used] == ["b.pdf"]
    assert [h.path for _, h in used_sources("Check the oil weekly, always.", HITS)[1]] == ["c.txt"]
    assert sources_lines("I do not know.", HITS)[0] == "Retrieved (the reply used none of them):"


def test_the_system_turn_numbers_the_sources():
    text = grounded(HITS[:2], "Be brief.")
    assert text.startswith("Be brief.\n\nAnswer the user's question from these sources.")
    assert "[1] Replace the belt of the Brantel press" in text and "[2] Replace the belt of the Morvik" in text
