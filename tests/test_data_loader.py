"""The loader: batches are a pure function of (seed, sample numbers), windows are drawn without
replacement per epoch, ranks are disjoint, padding is ignored, and mismatches are refused.
Datasets here are written by hand (conftest's `make_dataset`: tokens = 0, 1, 2, ...), so every
window has a known answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from palm.data import (
    DataError,
    TokenWindows,
    epoch_permutation,
    load_manifest,
    rank_sample_indices,
)
from palm.data.loader import _splitmix64_array, splitmix64
from palm.data.manifest import FORMAT_VERSION


def test_splitmix64_matches_scalar_reference() -> None:
    xs = [0, 1, 2, 12345, 2**63, 2**64 - 1]
    got = _splitmix64_array(np.array(xs, dtype=np.uint64))
    assert [int(v) for v in got] == [splitmix64(x) for x in xs]
    # Known first output of the reference splitmix64 generator seeded with 0
    # (Vigna's splitmix64.c: state += golden gamma, then the finalizer).
    assert splitmix64(0) == 0xE220A8397B1DCDAF


def test_epoch_permutation_is_a_permutation_and_varies() -> None:
    p0, p1 = epoch_permutation(7, 0, 1000), epoch_permutation(7, 1, 1000)
    assert sorted(p0.tolist()) == list(range(1000)) == sorted(p1.tolist())
    assert not np.array_equal(p0, p1)
    assert not np.array_equal(p0, epoch_permutation(8, 0, 1000))
    assert np.array_equal(p0, epoch_permutation(7, 0, 1000))


def test_windows_are_exact_and_cover_each_epoch_once(tmp_path: Path, make_dataset) -> None:
    seq_len, n_tokens = 8, 8 * 25 + 1
    tokens = np.arange(n_tokens)
    windows = TokenWindows(make_dataset(tmp_path, tokens), "train", seq_len, seed=3)
    assert len(windows) == 25
    x, y = windows.batch(np.arange(50))  # two full epochs
    assert x.shape == y.shape == (50, seq_len) and x.dtype == y.dtype
    assert str(x.dtype) == "torch.int64"
    assert (y == x + 1).all()  # targets are the inputs shifted by one
    starts = x[:, 0].numpy()
    assert (starts % seq_len == 0).all()
    assert sorted(starts[:25].tolist()) == list(range(0, 200, 8))  # epoch 0: each window once
    assert sorted(starts[25:].tolist()) == list(range(0, 200, 8))  # epoch 1: again, reshuffled
    assert starts[:25].tolist() != starts[25:].tolist()
    # Every token after the first is a target exactly once per epoch.
    assert sorted(y[:25].reshape(-1).tolist()) == list(range(1, n_tokens))


def test_resume_is_bit_exact_and_ranks_are_disjoint(tmp_path: Path, make_dataset) -> None:
    folder = make_dataset(tmp_path, np.arange(8 * 48 + 1))  # 48 windows = 4 steps of 12
    run = TokenWindows(folder, "train", 8, seed=11)
    global_batch, world = 12, 3
    # Uninterrupted: steps 0..9 on one process, the whole global batch.
    full = [run.batch(np.arange(k * global_batch, (k + 1) * global_batch))[0] for k in range(10)]
    # Resumed at step 6 in a fresh object, as 3 ranks.
    resumed = TokenWindows(folder, "train", 8, seed=11)
    for k in range(6, 10):
        parts = [
            resumed.batch(rank_sample_indices(k * global_batch, global_batch, r, world))[0]
            for r in range(world)
        ]
        assert np.array_equal(np.concatenate(parts), full[k].numpy())
        seen = [tuple(row) for part in parts for row in part.numpy().tolist()]
        assert len(set(seen)) == global_batch  # no window twice in one step


def test_rank_sample_indices() -> None:
    slices = [rank_sample_indices(100, 8, r, 4) for r in range(4)]
    assert np.concatenate(slices).tolist() == list(range(100, 108))
    with pytest.raises(ValueError, match="not divisible"):
        rank_sample_indices(0, 10, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        rank_sample_indices(0, 8, 4, 4)


def test_padding_is_ignored_in_targets(tmp_path: Path, make_dataset) -> None:
    # Rows of seq_len + 1 = 5: a document "5 6 <eod>" padded with 0.
    rows = np.array([[5, 6, 7, 8, 9], [9, 10, 1, 0, 0]])
    folder = make_dataset(tmp_path, rows.reshape(-1), layout="padded", seq_len=4)
    windows = TokenWindows(folder, "train", 4, seed=0)
    assert len(windows) == 2
    x, y = windows.batch([windows.windows([0, 1]).tolist().index(1)])
    assert x.tolist() == [[9, 10, 1, 0]] and y.tolist() == [[10, 1, -100, -100]]
    with pytest.raises(DataError, match="--seq_len 8"):
        TokenWindows(folder, "train", 8, seed=0)


def test_check_compatible(tmp_path: Path, make_dataset) -> None:
    windows = TokenWindows(make_dataset(tmp_path, np.arange(100), vocab_size=500), "train", 8, 0)
    windows.check_compatible("ab" * 32, 512)
    windows.check_compatible(None, 500)
    with pytest.raises(DataError, match="vocab_size >= 500"):
        windows.check_compatible("ab" * 32, 499)
    with pytest.raises(DataError, match="tokenizer sha256"):
        windows.check_compatible("cd" * 32, 512)


def test_missing_corrupt_and_truncated_are_clear(tmp_path: Path, make_dataset) -> None:
    with pytest.raises(DataError, match=r"meta.json: not found.*download.py"):
        load_manifest(tmp_path / "nothing")
    folder = make_dataset(tmp_path / "d", np.arange(100))
    (folder / "meta.json").write_text("{ not json")
    with pytest.raises(DataError, match="corrupt.*download.py"):
        load_manifest(folder)
    folder = make_dataset(tmp_path / "e", np.arange(100))
    raw = json.loads((folder / "meta.json").read_text())
    del raw["dtype"]
    (folder / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="missing dtype"):
        load_manifest(folder)
    folder = make_dataset(tmp_path / "f", np.arange(100))
    with open(folder / "train.bin", "r+b") as handle:
        handle.truncate(50)
    with pytest.raises(DataError, match="truncated"):
        TokenWindows(folder, "train", 8, 0)
    with pytest.raises(DataError, match="no split 'validation'"):
        TokenWindows(folder, "validation", 8, 0)
    assert load_manifest(folder).format_version == FORMAT_VERSION
