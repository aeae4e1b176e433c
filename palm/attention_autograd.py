"""Causal multi-query attention in tiles, one autograd node, for training on the CPU.

PaLM's attention is multi-query (§2): every query head attends over one shared key/value head.
So the H query heads of a position are H rows against the same keys, and a tile of Tb positions
is one (Tb * H, e) score matrix per sequence, made by one batched matmul against the first e
keys (e = the tile's last position + 1: the causal mask skips every later key; only the tile's
own diagonal block is masked). The rows stay in the fused projection's (position, head) order,
so the output is (B, T, H * Q) without a transpose.

Why not torch's SDPA: on the CPU its flash kernel recomputes the scores in backward and works in
small blocks. At palm's benchmark sizes this node's forward + backward takes 0.63-0.78x the time
of litgpt's SDPA (benchmarks/train_step.py --breakdown, attention column; RESULTS.md, run 11,
issue 16): fewer, larger matmuls and no second pass over the scores. The price
is memory: the probabilities of every tile are kept for backward (about B * H * T^2 / 2 floats a
layer, where SDPA keeps O(T) a row), so the model uses this only where that is no more than the
fused projection's rows of the layer (palm.flops.fits_saved_probs), in CPU training: eager as an
autograd Function whose buffer is reused step to step, compiled as a custom op. CUDA keeps SDPA's
flash kernel. `tests/test_attention_autograd.py` holds it to float64 attention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from palm.dtensor import dtensor_type
from palm.flops import ATTENTION_TILE as TILE
from palm.flops import attention_tiles as tiles
from palm.flops import fits_saved_probs, saved_probs_per_sequence


def tiles_serve(q: Tensor, fused_rows: int) -> bool:
    """Whether this node serves queries q (B, H, T, Q): training on the CPU in float32/64, eager
    (or compiled: as a custom op), where the kept probabilities fit in the layer's fused rows.
    CUDA keeps SDPA's flash kernel, sharded (DTensor) and fake (dry run) tensors SDPA too."""
    sharded = isinstance(q, dtensor_type() or ())  # DTensor: the custom op has no sharding rule
    return (
        q.requires_grad
        and q.device.type == "cpu"
        and (type(q) is Tensor or (torch.compiler.is_compiling() and not sharded))
        and q.dtype in (torch.float32, torch.float64)
        and fits_saved_probs(q.shape[2], q.shape[1], fused_rows)
    )


def attend_tiles(q: Tensor, k: Tensor, v: Tensor, heads: int, probs: Tensor) -> Tensor:
    """Forward: q (B, T*H, Q) in (position, head) rows, k, v (B, T, Q) -> (B, T*H, Q), each
    tile's probabilities written into its block of the flat buffer `probs`."""
    B, rows, D = q.shape
    T = rows // heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # The causal mask of a diagonal block, for its (position, head) rows: True = masked.
    future = torch.ones(TILE, TILE, dtype=torch.bool, device=q.device).triu_(1)
    future = future.repeat_interleave(heads, dim=0)
    for (start, end), p in zip(tiles(T), tile_views(probs, B, heads, T)):
        r = slice(start * heads, end * heads)
        # Scores scaled inside the matmul (alpha), softmax in place: one block per tile.
        torch.baddbmm(p, q[:, r], k[:, :end].transpose(1, 2), beta=0, alpha=D**-0.5, out=p)
        p[:, :, start:].masked_fill_(future[: (end - start) * heads, : end - start], -torch.inf)
        torch.softmax(p, dim=-1, out=p)
        torch.bmm(p, v[:, :end], out=out[:, r])
    return out


def attend_tiles_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, heads: int, probs: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of q, k, v from the kept probabilities: no scores made again."""
    scale = q.shape[-1] ** -0.5
    grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grad_k = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    grad_v = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    B, T = q.shape[0], q.shape[1] // heads
    for (start, end), p in zip(tiles(T), tile_views(probs, B, heads, T)):
        r = slice(start * heads, end * heads)
        g = grad_out[:, r]
        grad_v[:, :end].baddbmm_(p.transpose(1, 2), g)
        grad_p = torch.bmm(g, v[:, :end].transpose(1, 2))
        # Softmax's backward, p * (grad_p - rowsum(p * grad_p)), written over grad_p.
        torch.ops.aten._softmax_backward_data.out(grad_p, p, -1, p.dtype, grad_input=grad_p)
        grad_scores = grad_p  # masked entries have p = 0, so their gradient is 0
        torch.baddbmm(grad_q[:, r], grad_scores, k[:, :end], beta=0, alpha=scale, out=grad_q[:, r])
        grad_k[:, :end].baddbmm_(grad_scores.transpose(1, 2), q[:, r], alpha=scale)
    return grad_q, grad_k, grad_v


class _CausalMQA(torch.autograd.Function):
    """Eager: the probabilities' buffer comes from, and goes back to, the caller's pool."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, heads: int, pool: list[Tensor]) -> Tensor:
        T = q.shape[1] // heads
        probs = take_buffer(pool, q.shape[0] * saved_probs_per_sequence(T, heads), q)
        out = attend_tiles(q, k, v, heads, probs)
        ctx.save_for_backward(q, k, v, probs)
        ctx.heads, ctx.pool = heads, pool
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, probs = ctx.saved_tensors
        grads = attend_tiles_backward(grad_out, q, k, v, ctx.heads, probs)
        # The probabilities' memory goes back for the next step. Should this graph be run
        # backward again (retain_graph) after a later forward wrote over it, autograd's version
        # check of the saved buffer raises instead of using wrong values.
        ctx.pool.append(probs)
        return *grads, None, None


# Compiled: the same kernels as two custom ops, opaque to torch.compile (no graph break, and
# Inductor does not trace into the tile loop); their buffer is new each step.
@torch.library.custom_op("palm::causal_mqa", mutates_args=())
def _causal_mqa_op(q: Tensor, k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    T = q.shape[1] // heads
    probs = q.new_empty(q.shape[0] * saved_probs_per_sequence(T, heads))
    return attend_tiles(q, k, v, heads, probs), probs


@_causal_mqa_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    T = q.shape[1] // heads
    return q.new_empty(q.shape), q.new_empty(q.shape[0] * saved_probs_per_sequence(T, heads))


@torch.library.custom_op("palm::causal_mqa_backward", mutates_args=())
def _causal_mqa_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, heads: int, probs: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return attend_tiles_backward(grad_out.contiguous(), q, k, v, heads, probs)


@_causal_mqa_backward_op.register_fake
def _(grad_out, q, k, v, heads, probs) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, heads = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.heads = heads


def _op_backward(ctx, grad_out: Tensor, _grad_probs: Tensor):
    q, k, v, probs = ctx.saved_tensors
    return *_causal_mqa_backward_op(grad_out, q, k, v, ctx.heads, probs), None


_causal_mqa_op.register_autograd(_op_backward, setup_context=_setup_context)


def take_buffer(pool: list[Tensor], numel: int, like: Tensor) -> Tensor:
    """A flat buffer of `numel` elements: one from `pool` that fits, else a new one (buffers of
    another size, dtype or device are dropped: the model changed). Kept from step to step, the
    probabilities' memory is not handed back to the C library and faulted in again (glibc's
    heap shrinks and grows each step otherwise: benchmarks/RESULTS.md, issue 16)."""
    fits = [b for b in pool if (b.numel(), b.dtype, b.device) == (numel, like.dtype, like.device)]
    pool[:] = fits[1:]
    return fits[0] if fits else torch.empty(numel, dtype=like.dtype, device=like.device)


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
    if torch.compiler.is_compiling():
        return _causal_mqa_op(rows, k[:, 0], v[:, 0], H)[0].view(B, T, H * Q)
    pool = [] if pool is None else pool
    return _CausalMQA.apply(rows, k[:, 0], v[:, 0], H, pool).view(B, T, H * Q)
