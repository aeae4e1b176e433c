"""Causal multi-query attention as one autograd node, for eager training on the CPU.

PaLM's attention is multi-query (§2): every query head attends over one shared key/value head.
So the H query heads of a position are H rows against the same keys, and a tile of Tb positions
is one (Tb * H, e) score matrix per sequence, made by one batched matmul against the first e
keys (e = the tile's last position + 1: the causal mask skips every later key; only the tile's
own diagonal block is masked). The rows stay in the fused projection's (position, head) order,
so the output is (B, T, H * Q) without a transpose.

Why not torch's SDPA: on the CPU its flash kernel recomputes the scores in backward and works in
small blocks; measured at palm's benchmark sizes (benchmarks/train_step.py S and M), forward +
backward of this node took 0.70-0.75x the time of SDPA with the shared head expanded. The price
is memory: the probabilities of every tile are kept for backward (about B * H * T^2 / 2 floats a
layer, where SDPA keeps O(T) a row), so the model uses this only where that is no more than the
fused projection's rows of the layer (`fits_saved_probs`), in eager CPU training; compiled and
CUDA paths keep SDPA. `tests/test_attention_autograd.py` holds it to float64 attention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from palm.flops import ATTENTION_TILE as TILE
from palm.flops import fits_saved_probs, saved_probs_per_sequence


def tiles(length: int, tile: int = TILE) -> list[tuple[int, int]]:
    """(start, end) of each tile of positions."""
    return [(start, min(start + tile, length)) for start in range(0, length, tile)]


def tiles_serve(q: Tensor, fused_rows: int) -> bool:
    """Whether this node serves queries q (B, H, T, Q): eager training on the CPU in float32/64,
    where the kept probabilities fit in the layer's fused rows (compile, CUDA: SDPA)."""
    return (
        q.requires_grad
        and q.device.type == "cpu"
        and type(q) is Tensor
        and q.dtype in (torch.float32, torch.float64)
        and not torch.compiler.is_compiling()
        and fits_saved_probs(q.shape[2], q.shape[1], fused_rows)
    )


class _CausalMQA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, heads: int, pool: list[Tensor]) -> Tensor:
        B, rows, D = q.shape  # rows = T * heads, in (position, head) order
        scale = D**-0.5
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        # The causal mask of a diagonal block, for its (position, head) rows: True = masked.
        future = torch.ones(TILE, TILE, dtype=torch.bool, device=q.device).triu_(1)
        future = future.repeat_interleave(heads, dim=0)
        T = rows // heads
        probs = take_buffer(pool, B * saved_probs_per_sequence(T, heads), q)
        for (start, end), p in zip(tiles(T), tile_views(probs, B, heads, T)):
            r = slice(start * heads, end * heads)
            # Scores scaled inside the matmul (alpha), softmax in place: one block per tile.
            torch.baddbmm(p, q[:, r], k[:, :end].transpose(1, 2), beta=0, alpha=scale, out=p)
            p[:, :, start:].masked_fill_(future[: (end - start) * heads, : end - start], -torch.inf)
            torch.softmax(p, dim=-1, out=p)
            torch.bmm(p, v[:, :end], out=out[:, r])
        ctx.save_for_backward(q, k, v, probs)
        ctx.heads, ctx.pool = heads, pool
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, probs = ctx.saved_tensors
        heads = ctx.heads
        scale = q.shape[-1] ** -0.5
        grad_q = torch.empty_like(q, memory_format=torch.contiguous_format)
        grad_k = torch.zeros_like(k, memory_format=torch.contiguous_format)
        grad_v = torch.zeros_like(v, memory_format=torch.contiguous_format)
        B, T = q.shape[0], q.shape[1] // heads
        for (start, end), p in zip(tiles(T), tile_views(probs, B, heads, T)):
            r = slice(start * heads, end * heads)
            g = grad_out[:, r]
            grad_v[:, :end].baddbmm_(p.transpose(1, 2), g)
            grad_p = torch.bmm(g, v[:, :end].transpose(1, 2))
            # Softmax's backward, p * (grad_p - rowsum(p * grad_p)), written over grad_p.
            torch.ops.aten._softmax_backward_data.out(grad_p, p, -1, p.dtype, grad_input=grad_p)
            grad_scores = grad_p  # masked entries have p = 0, so their gradient is 0
            torch.baddbmm(
                grad_q[:, r], grad_scores, k[:, :end], beta=0, alpha=scale, out=grad_q[:, r]
            )
            grad_k[:, :end].baddbmm_(grad_scores.transpose(1, 2), q[:, r], alpha=scale)
        # The probabilities' memory goes back for the next step. Should this graph be run
        # backward again (retain_graph) after a later forward wrote over it, autograd's version
        # check of the saved buffer raises instead of using wrong values.
        ctx.pool.append(probs)
        return grad_q, grad_k, grad_v, None, None


def take_buffer(pool: list[Tensor], numel: int, like: Tensor) -> Tensor:
    """A flat buffer of `numel` elements: one from `pool` that fits, else a new one. Kept from
    step to step, the probabilities' memory is not handed back to the C library and faulted in
    again (under glibc a heap that shrinks and grows each step: page faults, as in
    benchmarks/RESULTS.md, issue 16)."""
    for i, buffer in enumerate(pool):
        if buffer.numel() == numel and buffer.dtype == like.dtype and buffer.device == like.device:
            return pool.pop(i)
    return torch.empty(numel, dtype=like.dtype, device=like.device)


def tile_views(probs: Tensor, batch: int, heads: int, length: int) -> list[Tensor]:
    """Each tile's (B, rows, e) block of the flat buffer, one after another."""
    views, offset = [], 0
    for start, end in tiles(length):
        size = batch * (end - start) * heads * end
        views.append(probs[offset : offset + size].view(batch, (end - start) * heads, end))
        offset += size
    return views


def causal_mqa(q: Tensor, k: Tensor, v: Tensor, pool: list[Tensor] | None = None) -> Tensor:
    """Causal attention of q (B, H, T, Q) over one shared head k, v (B, 1, T, Q) -> (B, T, H*Q),
    the same values and gradients as scaled_dot_product_attention(..., is_causal=True) with the
    shared head expanded. q is fastest as a view of (B, T, H, Q) memory (the order the fused
    projection's rows come in; the eager block middle writes the rotated queries so). `pool`
    (a list the caller keeps, e.g. one per layer) lends the kept probabilities' memory from one
    step to the next."""
    B, H, T, Q = q.shape
    rows = q.transpose(1, 2).reshape(B, T * H, Q)  # free when q is a view of (B, T, H, Q)
    pool = [] if pool is None else pool
    return _CausalMQA.apply(rows, k[:, 0], v[:, 0], H, pool).view(B, T, H * Q)
