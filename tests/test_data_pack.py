"""Packing layouts, document cutting, word counts and split assignment, each alone."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palm.data.corpus import count_words, iter_documents, split_of
from palm.data.pack import combine_documents, pad_document, token_dtype

WIKITEXT2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
needs_wikitext2 = pytest.mark.skipif(
    not (WIKITEXT2 / "wiki.train.tokens").exists(),
    reason=f"WikiText-2 copy not found at {WIKITEXT2} (../shared/data beside the repository)",
)


def test_combine_puts_eod_after_every_document() -> None:
    assert combine_documents([[5, 6], [], [7]], eod_id=1).tolist() == [5, 6, 1, 1, 7, 1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(2, 99), max_size=40), st.integers(1, 9))
def test_pad_document_predicts_every_token_once(ids: list[int], seq_len: int) -> None:
    rows = pad_document(ids, eod_id=1, pad_id=0, seq_len=seq_len)
    assert rows.shape[1] == seq_len + 1
    targets = rows[:, 1:].reshape(-1)
    assert targets[targets != 0].tolist() == ([*ids[1:], 1] if ids else [])
    assert rows[0, 0] == (ids[0] if ids else 1)
    # Only the last row has padding, and only at its end.
    flat_last = rows[-1].tolist()
    first_pad = flat_last.index(0) if 0 in flat_last else len(flat_last)
    assert all(t == 0 for t in flat_last[first_pad:]) and (rows[:-1] != 0).all()


def test_token_dtype() -> None:
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_documents_concatenate_to_the_file(tmp_path: Path) -> None:
    text = " \n = A = \n \n a b \n = = Sub = = \n c \n \n = B = \n \n d \n"
    path = tmp_path / "wiki.train.tokens"
    path.write_text(text)
    docs = list(iter_documents(path, "wikitext"))
    assert len(docs) == 2 and "".join(docs) == text and docs[1].startswith(" = B = ")
    path.write_text("p1 l1\np1 l2\n\n\np2\n\r\n")
    assert list(iter_documents(path, "paragraph")) == ["p1 l1\np1 l2\n\n\n", "p2\n\r\n"]
    assert list(iter_documents(path, "line"))[:2] == ["p1 l1\n", "p1 l2\n"]
    assert list(iter_documents(path, "file")) == ["p1 l1\np1 l2\n\n\np2\n\r\n"]


@needs_wikitext2
def test_wikitext2_word_counts_and_articles() -> None:
    """The published counts (words + one <eos> per line) and the article count."""
    for name, words in (("wiki.train.tokens", 2_088_628), ("wiki.valid.tokens", 217_646)):
        docs = list(iter_documents(WIKITEXT2 / name, "wikitext"))
        assert sum(count_words(d) for d in docs) == words
        text = (WIKITEXT2 / name).read_text(encoding="utf-8")
        assert "".join(docs) == text
        titles = re.findall(r"^ = [^=].* = $", text, flags=re.MULTILINE)
        assert len(docs) == len(titles)  # one document per level-1 heading (valid: 60)
    assert len(list(iter_documents(WIKITEXT2 / "wiki.valid.tokens", "wikitext"))) == 60


def test_split_of_is_deterministic_and_proportional() -> None:
    labels = [split_of(f"document {i}", 0.1, 0.2) for i in range(5000)]
    assert labels == [split_of(f"document {i}", 0.1, 0.2) for i in range(5000)]
    share = {s: labels.count(s) / 5000 for s in ("train", "validation", "test")}
    assert abs(share["validation"] - 0.1) < 0.02 and abs(share["test"] - 0.2) < 0.02
