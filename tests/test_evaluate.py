"""evaluate.py perplexity: sliding windows against a per-token brute force, word-level
perplexity and bits per byte against a hand computation from the raw text, --json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from palm.cli.evaluate import main
from palm.model import PaLM
from palm.perplexity import score_documents, split_documents, windows
from palm.runs import load_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, prepare_dataset, write_run) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    dataset = prepare_dataset(root)
    return dataset, write_run(root, dataset)


@torch.no_grad()
def reference_nll(model: PaLM, doc: list[int], prefix: int, context: int, stride: int) -> float:
    """Target j of s = [prefix] + doc is predicted from s[b:j], b the first window start
    (a multiple of stride) with b + context >= j: one forward per token, no batching."""
    seq = [prefix, *doc]
    total = 0.0
    for j in range(1, len(seq)):
        b = max(0, math.ceil((j - context) / stride) * stride)
        logits = model(torch.tensor([seq[b:j]]))[0, -1]
        total -= float(F.log_softmax(logits.double(), -1)[seq[j]])
    return total


def test_windows_score_every_target_once_within_the_context():
    for n, context, stride in [(1, 4, 4), (23, 8, 3), (40, 8, 8), (8, 8, 1), (9, 8, 5)]:
        scored = []
        for begin, end, n_scored in windows(n, context, stride):
            assert 0 < end - begin <= context and n_scored <= end - begin
            scored += range(end - n_scored + 1, end + 1)
        assert scored == list(range(1, n + 1))
    with pytest.raises(ValueError, match="stride"):
        list(windows(10, 4, 5))


def test_sliding_window_nll_matches_per_token_brute_force(tiny_model_config):
    torch.manual_seed(0)
    model = PaLM(tiny_model_config(vocab_size=50, max_seq_len=16)).eval()
    docs = [torch.randint(2, 50, (n,)).tolist() for n in (5, 23, 40, 1)]
    for context, stride in [(8, 3), (8, 8), (16, 1)]:
        got = score_documents(model, docs, 1, context, stride, batch_size=3)
        for doc, (nll, n) in zip(docs, got):
            assert n == len(doc)
            assert nll == pytest.approx(reference_nll(model, doc, 1, context, stride), rel=1e-4)


def test_split_documents_cuts_at_eod_and_drops_padding():
    docs = split_documents(torch.tensor([5, 6, 1, 7, 1, 0, 0, 8, 9]).numpy(), eod_id=1, pad_id=0)
    assert [d.tolist() for d in docs] == [[5, 6], [7], [8, 9]]


def run_json(capsys, *argv) -> dict:
    rc = main([str(a) for a in argv] + ["--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


@torch.no_grad()
def test_word_perplexity_and_bits_per_byte_match_a_hand_computation(setup, capsys):
    dataset, run = setup
    result = run_json(capsys, run, "--data", dataset, "--split", "valid", "--device", "cpu")
    # Independent reference: the raw text's words (whitespace words + one <eos> per line, the
    # WikiText convention) and bytes, and the NLL of each document from one full forward.
    text = (dataset.parent.parent / "corpus" / "validation.txt").read_text()
    words = len(text.split()) + text.count("\n")
    loaded = load_model(run)
    tok = loaded.tokenizer
    # download.py --documents paragraph: a blank line stays with the paragraph before it.
    parts = text.split("\n\n")
    paragraphs = [p + "\n\n" for p in parts[:-1]] + [parts[-1]]
    nll = 0.0
    for paragraph in paragraphs:
        seq = torch.tensor([[tok.eod_id] + tok.encode(paragraph)])
        assert seq.shape[1] <= loaded.model.config.max_seq_len  # one window: exact reference
        logits = loaded.model(seq)[0, :-1].double()
        nll += float(F.cross_entropy(logits, seq[0, 1:], reduction="sum"))
    assert result["n_words"] == words and result["n_bytes"] == len(text.encode())
    assert result["n_documents"] == 20
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(
        nll / math.log(2) / len(text.encode()), rel=1e-5
    )
    assert result["token_perplexity"] == pytest.approx(math.exp(nll / result["n_tokens"]), rel=1e-5)
    # The same text given as a file, cut into the same documents, scores the same.
    as_text = run_json(
        capsys,
        run,
        "--text",
        dataset.parent.parent / "corpus" / "validation.txt",
        "--documents",
        "paragraph",
    )
    for key in ("nll", "n_tokens", "n_words", "n_bytes", "n_documents"):
        assert as_text[key] == pytest.approx(result[key], rel=1e-6), key


def test_max_documents_recounts_words_and_stride_changes_context(setup, capsys):
    dataset, run = setup
    few = run_json(
        capsys,
        run,
        "--data",
        dataset,
        "--split",
        "test",
        "--max_documents",
        3,
        "--context",
        32,
        "--stride",
        8,
    )
    text = (dataset.parent.parent / "corpus" / "test.txt").read_text()
    first = "".join(p + "\n\n" for p in text.split("\n\n")[:3])
    assert few["n_documents"] == 3
    assert few["n_words"] == len(first.split()) + first.count("\n")
    assert (few["context"], few["stride"]) == (32, 8)
    disjoint = run_json(
        capsys,
        run,
        "--data",
        dataset,
        "--split",
        "test",
        "--max_documents",
        3,
        "--context",
        32,
        "--stride",
        32,
    )
    assert disjoint["n_tokens"] == few["n_tokens"] and disjoint["nll"] != few["nll"]


def test_evaluate_errors_are_one_clear_line(setup, capsys, tmp_path):
    dataset, run = setup
    # Exit 2: a bad command line; 1: a runtime failure (missing files), as every command.
    cases = [
        ((run,), "choose one job", 2),
        ((run, "--data", tmp_path / "missing"), "meta.json: not found", 1),
        ((run, "--data", dataset, "--split", "dev"), "no split 'dev'", 1),
        ((run, "--data", dataset, "--context", 16, "--stride", 32), "--stride 32", 2),
        ((run, "--data", dataset, "--context", 4096), "exceeds the model's max_seq_len", 2),
        ((tmp_path / "nope", "--data", dataset), "no such checkpoint", 1),
    ]
    for argv, message, code in cases:
        assert main([str(a) for a in argv]) == code, message
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error:") and message in last, last
