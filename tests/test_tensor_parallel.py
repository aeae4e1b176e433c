"""Tensor parallelism's pieces in one process: the fused weight's row layout, the vocabulary-
parallel loss (ranks as threads, against the single-device loss in float64), and the checks
that refuse a degree the model cannot split by. The multi-process runs are in
test_distributed.py."""

from __future__ import annotations

import threading

import pytest
import torch

from palm.config import ModelConfig
from palm.distributed import init_distributed
from palm.dtensor import replicated_spans, rows_from_canonical, rows_to_canonical
from palm.errors import ConfigError
from palm.loss import IGNORE_INDEX, linear_lm_loss, vocab_parallel_lm_loss
from palm.parallel import check_tensor_parallel


def layout(tp: int, q: int = 8, kv: int = 2, f: int = 8, copies: int | None = None):
    """ROW_BLOCKS / ROW_GROUPS of a fused [q | k | v | value | gate] weight over tp ranks."""
    copies = tp if copies is None else copies
    kv_rows = kv if copies > 1 else kv // tp
    share = [(q // tp, 1), (kv_rows, copies), (kv_rows, copies), (f // tp, 1), (f // tp, 1)]
    return tuple(r for r, _ in share) * tp, tuple((i, c) for i, (_, c) in enumerate(share)) * tp


@pytest.mark.parametrize("tp,copies", [(1, 1), (2, 2), (2, 1), (4, 4)])
def test_rows_round_trip_and_give_each_rank_its_own_rows(tp, copies):
    blocks, groups = layout(tp, copies=copies)
    canonical = torch.arange(8 + 2 + 2 + 8 + 8, dtype=torch.float64)[:, None].repeat(1, 3)
    spread = rows_from_canonical(canonical, blocks, groups)
    assert spread.shape[0] == sum(blocks)
    assert torch.equal(rows_to_canonical(spread, blocks, groups), canonical)
    rank_rows = spread[:, 0].view(tp, -1)
    q, k, v = canonical[:8, 0], canonical[8:10, 0], canonical[10:12, 0]
    for r in range(tp):  # rank r: its query heads, the key/value head, its MLP rows
        mine = rank_rows[r]
        assert torch.equal(mine[: 8 // tp], q[r * 8 // tp : (r + 1) * 8 // tp])
        if copies > 1:
            assert torch.equal(mine[8 // tp : 8 // tp + 4], torch.cat((k, v)))
    if copies > 1:
        width = 8 // tp + 4 + 2 * (8 // tp)
        assert replicated_spans(_tagged(spread, blocks, groups)) == [
            (r * width + 8 // tp, 4) for r in range(tp)
        ]


def _tagged(t, blocks, groups):
    t = t.clone()
    t.row_blocks, t.row_groups = blocks, groups
    return t


class ThreadRanks:
    """`all_reduce(t, op)` across `n` threads, each standing for one tensor-parallel rank."""

    def __init__(self, n: int) -> None:
        self.n, self.barrier, self.slots = n, threading.Barrier(n), {}

    def reducer(self, rank: int):
        def all_reduce(t: torch.Tensor, op: str) -> None:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            parts = [self.slots[r] for r in range(self.n)]
            self.barrier.wait()
            stacked = torch.stack(parts)
            t.copy_(stacked.sum(0) if op == "sum" else stacked.max(0).values)

        return all_reduce


@pytest.mark.parametrize("tp", [2, 4])
def test_vocabulary_parallel_loss_equals_the_single_device_loss_in_float64(tp):
    torch.manual_seed(0)
    n, d, vocab = 24, 8, 32
    hidden = torch.randn(n, d, dtype=torch.float64) * 3
    weight = torch.randn(vocab, d, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,))
    targets[::5] = IGNORE_INDEX
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    reference = linear_lm_loss(h_ref, w_ref, targets, 1e-2, chunk_tokens=7)
    reference.loss.backward()

    ranks, results = ThreadRanks(tp), {}

    def rank(r: int) -> None:
        rows = vocab // tp
        h = hidden.clone().requires_grad_()
        w = weight[r * rows : (r + 1) * rows].clone().requires_grad_()
        out = vocab_parallel_lm_loss(
            h, w, r * rows, targets, ranks.reducer(r), 1e-2, chunk_tokens=7
        )
        out.loss.backward()
        results[r] = (out, h.grad, w.grad)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in range(tp):
        out, grad_h, _ = results[r]
        for got, want in zip(out[:3], reference[:3]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert out.n_tokens == reference.n_tokens
        torch.testing.assert_close(grad_h, h_ref.grad, rtol=1e-10, atol=1e-12)
    grad_w = torch.cat([results[r][2] for r in range(tp)])
    torch.testing.assert_close(grad_w, w_ref.grad, rtol=1e-10, atol=1e-12)


def test_a_degree_the_model_cannot_split_by_is_one_error():
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, head_dim=16)
    check_tensor_parallel(config, 2)
    with pytest.raises(ConfigError, match="does not divide model.n_heads = 2"):
        check_tensor_parallel(config, 4)
    odd_vocab = ModelConfig(vocab_size=63, d_model=32, n_layers=1, n_heads=2, head_dim=16)
    with pytest.raises(ConfigError, match="model.vocab_size = 63"):
        check_tensor_parallel(odd_vocab, 2)
    serial = ModelConfig(
        vocab_size=64, d_model=32, n_layers=1, n_heads=2, head_dim=16, parallel_block=False
    )
    with pytest.raises(ConfigError, match="parallel_block"):
        check_tensor_parallel(serial, 2)


def test_a_degree_that_does_not_divide_the_processes_is_one_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="tensor_parallel=2 does not divide the 3 processes"):
        init_distributed("fsdp", "cpu", 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="use train.parallel=fsdp"):
        init_distributed("ddp", "cpu", 2)
    with pytest.raises(ConfigError, match="train.parallel=none with train.tensor_parallel=2"):
        init_distributed("none", "cpu", 2)
