"""Memorization (PaLM §7): exact-match rate against an independent reference.

The reference model has its attention and MLP outputs zeroed, so its next token depends only on
the current one: greedy decoding is a known map f. A span is then memorized exactly when its
last 51 tokens follow f, which can be checked without running the decoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from palm.cli.evaluate import main
from palm.kv_cache import PackedWeights, TransposedWeights
from palm.memorization import memorization, sample_span_starts
from palm.model import PaLM

V = 50


@pytest.fixture(scope="module")
def bigram(tiny_model_config) -> tuple[PaLM, np.ndarray]:
    torch.manual_seed(0)
    config = tiny_model_config(V, max_seq_len=128)
    model = PaLM(type(config)(**{**config.to_dict(), "tie_embeddings": False})).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn_out.weight.zero_()
            block.mlp_out.weight.zero_()
        f = model(torch.arange(V)[:, None])[:, -1].argmax(-1).numpy()  # (V,) next-token map
    return model, f


def stream(f: np.ndarray, rng: np.random.Generator, memorized: bool) -> np.ndarray:
    """Chains that follow f (memorizable) alternating with random tokens."""
    pieces = []
    for _ in range(30):
        if memorized:
            chain = [int(rng.integers(V))]
            for _ in range(rng.integers(60, 160)):
                chain.append(int(f[chain[-1]]))
            pieces.append(chain)
        pieces.append(rng.integers(0, V, size=int(rng.integers(20, 60))).tolist())
    return np.concatenate(pieces).astype(np.uint16)


def test_exact_match_rate_equals_the_reference(bigram, weight_copies_made):
    model, f = bigram
    rng = np.random.default_rng(0)
    made = weight_copies_made  # one set per study (4 batches each), not one per batch
    for memorized in (True, False):
        tokens = stream(f, rng, memorized)
        result = memorization(model, tokens, "train", n_spans=60, batch_size=16, seed=1)
        expected = [
            all(tokens[s + t + 1] == f[tokens[s + t]] for t in range(49, 99)) for s in result.starts
        ]
        assert result.n_spans == 60 and len(set(result.starts)) == 60
        assert result.matched == expected
        assert result.exact_matches == sum(expected)
        if memorized:
            assert 0 < result.exact_match_rate < 1  # both outcomes occur: a real check
        else:
            assert result.exact_match_rate == 0.0
        low, high = result.interval()
        assert low <= result.exact_match_rate <= high
    assert len(made) == 2  # CPU float32: on, once per study
    assert all(isinstance(m, (PackedWeights, TransposedWeights)) for m in made)


def test_span_sampling_is_seeded_bounded_and_skips_padding():
    tokens = np.arange(1, 400, dtype=np.int64)
    tokens[200] = 0
    a = sample_span_starts(tokens, 50, 100, seed=3, pad_id=0)
    assert np.array_equal(a, sample_span_starts(tokens, 50, 100, seed=3, pad_id=0))
    assert all(not (s <= 200 < s + 100) for s in a)
    everything = sample_span_starts(tokens, 10_000, 100, seed=3, pad_id=0)
    assert len(everything) == len(tokens) - 100 + 1 - 100  # all clean starts, each once


def test_cli_reports_train_and_held_out_rates(tmp_path: Path, capsys, prepare_dataset, write_run):
    dataset = prepare_dataset(tmp_path)
    run = write_run(tmp_path, dataset, val_losses=(1.0,))
    capsys.readouterr()  # download.py's own report
    rc = main(
        [
            str(run),
            "--data",
            str(dataset),
            "--memorization",
            "--spans",
            "12",
            "--batch_size",
            "12",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = json.loads(captured.out)["memorization"]
    assert set(out) == {"train", "validation"}
    for split in out.values():
        assert split["n_spans"] == 12 and split["prompt_tokens"] == 50
        assert 0.0 <= split["exact_match_rate"] <= 1.0
        assert 0.0 <= split["token_match_rate"] <= 1.0


def test_spans_stay_within_one_document():
    """As Carlini et al. sample within examples: no <eod> inside a span (it may open one)."""
    tokens = np.arange(10, 410, dtype=np.int64)
    tokens[150] = tokens[300] = 1  # two document boundaries
    starts = sample_span_starts(tokens, 10_000, 60, seed=0, eod_id=1)
    for s in starts:
        assert 1 not in tokens[s + 1 : s + 60], s
    assert 150 in starts and 300 in starts  # a span may start at a document's <eod>
    assert len(starts) == (400 - 60 + 1) - 2 * 59
