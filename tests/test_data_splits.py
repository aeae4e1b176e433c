"""palm.data.splits: held-out splits by document hash, or by cutting the text when a corpus has
too few documents, so `--split True` never gives an empty split by accident (issue 12)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from palm.cli.download import main as download
from palm.cli.evaluate import main as evaluate
from palm.data.corpus import local_corpus
from palm.data.splits import labeled_documents, plan_splits

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def play(lines: int, seed: int = 0) -> str:
    """A one-document 'play': speaker lines in paragraphs, like Tiny Shakespeare."""
    rng = random.Random(seed)
    words = ["thou", "art", "my", "lord", "and", "the", "king", "shall", "not", "die", "so"]
    out = []
    for i in range(lines):
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))).capitalize())
        if i % 4 == 3:
            out.append("")
    return "\n".join(out) + "\n"


def test_one_document_is_cut_losslessly_at_line_boundaries(tmp_path, capsys):
    text = play(400)
    (tmp_path / "play.txt").write_text(text)
    corpus = local_corpus(tmp_path / "play.txt", "auto")
    plan = plan_splits(corpus, True, 0.1, 0.05)
    assert plan.method == "cut" and "cutting the text instead" in capsys.readouterr().out
    pieces = list(labeled_documents(corpus, plan))
    assert [label for label, _ in pieces] == ["train", "validation", "test"]
    assert "".join(piece for _, piece in pieces) == text  # nothing lost, nothing repeated
    for _, piece in pieces[:-1]:
        assert piece.endswith("\n")  # cut at a line (here: a paragraph) boundary
    sizes = [len(piece) / len(text) for _, piece in pieces]
    assert sizes == pytest.approx([0.85, 0.1, 0.05], abs=0.02)
    assert list(labeled_documents(corpus, plan, only_train=True)) == pieces[:1]
    assert plan_splits(corpus, True, 0.1, 0.05) == plan  # deterministic


def test_many_documents_are_split_by_hash_reading_only_what_it_needs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(300):
        (folder / f"{i:03d}.txt").write_text(f"document {i}\n{play(2, seed=i)}")
    corpus = local_corpus(folder, "auto")
    assert plan_splits(corpus, True, 0.1, 0.1).method == "hash"
    labels = [label for label, _ in labeled_documents(corpus, plan_splits(corpus, True, 0.1, 0.1))]
    assert len(labels) == 300 and {"train", "validation", "test"} <= set(labels)
    assert plan_splits(corpus, False, 0.1, 0.1).method == "none"
    assert plan_splits(corpus, True, 0.0, 0.0).method == "hash"  # nothing held out, on purpose


def prepare(root: Path, corpus: Path, *flags: str, vocab: int = 300) -> Path:
    argv = ["--path", str(root), "--dataset", str(corpus), "--vocab_size", str(vocab)]
    argv += ["--model_type", "bpe", "--seq_len", "32", "--batch_size", "4", "--n_workers", "1"]
    assert download([*argv, "--split", "True", *flags]) == 0
    return root / corpus.stem


def test_a_single_file_corpus_gets_every_requested_split(tmp_path):
    (tmp_path / "play.txt").write_text(play(3000))
    data = prepare(tmp_path / "data", tmp_path / "play.txt", "--valid_fraction", "0.1")
    meta = json.loads((data / "meta.json").read_text())
    tokens = {name: split["n_tokens"] for name, split in meta["splits"].items()}
    assert min(tokens.values()) > 0, tokens
    assert tokens["validation"] / sum(tokens.values()) == pytest.approx(0.1, abs=0.03)
    assert meta["corpus"]["split"]["method"] == "cut"


def test_an_empty_split_is_only_on_purpose_and_evaluating_it_is_an_error(
    tmp_path, capsys, write_run
):
    (tmp_path / "play.txt").write_text(play(3000))
    data = prepare(
        tmp_path / "data", tmp_path / "play.txt", "--valid_fraction", "0.1", "--test_fraction", "0"
    )
    meta = json.loads((data / "meta.json").read_text())
    assert meta["splits"]["test"]["n_tokens"] == 0  # asked for: --test_fraction 0
    run = write_run(tmp_path, data, val_losses=(1.0,))
    capsys.readouterr()
    assert evaluate([str(run), "--data", str(data), "--split", "test", "--json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "split 'test' has no tokens" in err
    assert "--split True" in err


@pytest.mark.skipif(
    not (SHARED / "tinyshakespeare.txt").is_file(), reason="../shared/data is not beside the repo"
)
def test_tiny_shakespeare_gets_the_90_10_cut_nanogpt_users_expect(tmp_path):
    data = prepare(
        tmp_path / "data",
        SHARED / "tinyshakespeare.txt",
        "--valid_fraction",
        "0.1",
        "--test_fraction",
        "0",
        vocab=600,
    )
    meta = json.loads((data / "meta.json").read_text())
    train, valid = meta["splits"]["train"], meta["splits"]["validation"]
    assert valid["n_bytes"] / (train["n_bytes"] + valid["n_bytes"]) == pytest.approx(0.1, abs=0.01)
    assert valid["n_tokens"] > 10_000
