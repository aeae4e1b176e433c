"""The tokenizer is lossless (PaLM §2): decode(encode(s)) == s for any text, digits split,
special ids where the manifest says, and clear errors for impossible requests."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palm.data.corpus import stdlib_documents
from palm.tokenizer import (
    Tokenizer,
    TokenizerError,
    TokenizerTrainConfig,
    line_chunks,
    train_sentencepiece,
    vocab_file_text,
)


def _lines(max_bytes: int) -> list[str]:
    docs, _ = stdlib_documents(max_bytes)
    return [line for d in docs for line in d["text"].split("\n") if line]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    model = train_sentencepiece(_lines(150_000), TokenizerTrainConfig(600, "unigram", 2))
    return Tokenizer(model, "tiny.model")


def test_fixed_special_ids(tokenizer: Tokenizer) -> None:
    assert (tokenizer.pad_id, tokenizer.eod_id) == (0, 1)
    assert [tokenizer.id_to_piece(i) for i in range(4)] == ["<pad>", "<eod>", "<unk>", "\n"]
    assert tokenizer.id_to_piece(4) == "<0x00>" and tokenizer.id_to_piece(259) == "<0xFF>"
    assert tokenizer.vocab_size == 600 and len(tokenizer.sha256) == 64


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_roundtrip_arbitrary_unicode(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=" \t\n\r\x0bab1é中🙂", max_size=300))
def test_roundtrip_whitespace_runs(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eod_id not in ids and tokenizer.pad_id not in ids


def test_digits_split_and_special_strings_are_text(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("x = 1234567.5")
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    for digit in "12345675":
        assert digit in pieces
    assert all(not (p.isdigit() and len(p) > 1) for p in pieces)
    # The literal text "<eod>" is text, never the control id.
    assert tokenizer.eod_id not in tokenizer.encode("<eod><pad>")
    assert tokenizer.decode(tokenizer.encode("<eod><pad>")) == "<eod><pad>"


def test_encoding_is_canonical(tokenizer: Tokenizer) -> None:
    """The packer (encode_batch, threads, other documents in the batch) and encode() agree,
    so a model trained on the token files sees exactly what generate/evaluate will encode."""
    docs, _ = stdlib_documents(60_000)
    text = "".join(d["text"] for d in docs)
    chunks = line_chunks(text)
    assert (
        len(chunks) > 5 and "".join(chunks) == text and all(c.endswith("\n") for c in chunks[:-1])
    )
    ids = tokenizer.encode(text)
    assert tokenizer.encode_batch(["a\n", text, ""], n_threads=2) == [
        tokenizer.encode("a\n"),
        ids,
        [],
    ]
    assert tokenizer.decode(ids) == text
    # Per-line encoding (SentencePiece alone) differs only where pieces tie in score, e.g.
    # which of "▁▁▁▁ ▁ ▁" / "▁ ▁ ▁▁▁▁" a run of spaces becomes: counts agree within 0.5%.
    lines = text.split("\n")
    per_line = sum(len(tokenizer._sp.encode(part + "\n")) for part in lines[:-1])
    per_line += len(tokenizer._sp.encode(lines[-1]))
    assert abs(len(ids) - per_line) <= 0.005 * per_line


def test_vocab_file_one_piece_per_line(tokenizer: Tokenizer) -> None:
    lines = vocab_file_text(tokenizer).split("\n")[:-1]
    assert len(lines) == tokenizer.vocab_size
    assert lines[:4] == ["<pad>", "<eod>", "<unk>", "\\n"]


def test_pickle_and_load(tokenizer: Tokenizer, tmp_path) -> None:
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.sha256 == tokenizer.sha256 and clone.encode("héllo\n") == tokenizer.encode(
        "héllo\n"
    )
    path = tmp_path / "t.model"
    path.write_bytes(tokenizer.model_bytes)
    assert Tokenizer.load(path).sha256 == tokenizer.sha256


def test_training_is_deterministic_with_threads() -> None:
    lines = _lines(40_000)
    a = train_sentencepiece(lines, TokenizerTrainConfig(400, "unigram", 2))
    b = train_sentencepiece(lines, TokenizerTrainConfig(400, "unigram", 2))
    assert a == b


def test_vocab_too_large_names_the_largest_size() -> None:
    with pytest.raises(TokenizerError, match=r"largest size that works is \d+"):
        train_sentencepiece(["hello world", "tiny corpus"] * 10, TokenizerTrainConfig(5000))


def test_vocab_too_small_names_the_smallest_size() -> None:
    """A text with many distinct characters needs a piece for each, besides the 256 bytes."""
    characters = "".join(chr(0x4E00 + i) for i in range(80))
    lines = [characters[i:] + characters[:i] for i in range(80)]
    with pytest.raises(TokenizerError, match=r"--vocab_size 300 is smaller .* use at least \d+"):
        train_sentencepiece(lines, TokenizerTrainConfig(300))


def test_bad_files_are_clear_errors(tmp_path) -> None:
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="bad.model.*download.py"):
        Tokenizer.load(bad)
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        Tokenizer.load(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="too small"):
        TokenizerTrainConfig(100)


def test_sentencepieces_own_whitespace_mark_is_text_too(tokenizer: Tokenizer) -> None:
    """U+2581 is how SentencePiece marks a space; in the text it must come back as itself."""
    for text in ("\u2581", "x\u2581y", "\u2581\u2581 a \u2581", "line\n\u2581\n"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
