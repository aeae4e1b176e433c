"""The parallel block's pointwise middle as one autograd node, for eager training.

Between the fused input matmul and attention / the MLP's output matmul, the PaLM block (§2)
splits the fused rows into q, k, v and the SwiGLU halves, rotates q and k (RoPE) and takes
Swish(gate) * value. Left to autograd, the backward of that split is a `cat` of the five
pieces' gradients into a fresh (B, T, rows) tensor, and RoPE's rotate-half (chunk, neg, cat)
adds its own copies and saves the rotated halves. Here the backward writes every piece's
gradient straight into its rows of one buffer, and RoPE is a multiply and two multiply-adds, with
nothing saved but the fused rows, Swish(gate) and the tables (issue 16: the cats and negations
were ~2% of an eager step at size S). torch.compile fuses the plain ops by itself, so the model
uses this in eager mode only; `tests/test_block_autograd.py` holds it to the plain ops in float64.
It serves bf16 autocast too (bf16 rows, float32 tables): on an H200 the plain path's cats were
5% of an eager bf16 step's GPU time (benchmarks/RESULTS.md, "GPU check", run 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from palm.rope import RotaryTables


def rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, *, adjoint: bool) -> Tensor:
    """RoPE on halves (x1 | x2) (palm.rope.apply_rope's layout), written into `out`:

        forward:  out1 = x1 c1 - x2 s1,   out2 = x2 c2 + x1 s2
        adjoint:  out1 = x1 c1 + x2 s2,   out2 = x2 c2 - x1 s1   (the gradient of the forward)

    where (c1 | c2), (s1 | s2) are the halves of the (T, head_dim) tables. Computed in the
    tables' precision: under bf16 autocast (bf16 rows, float32 tables) in a float32 buffer,
    rounded into `out` once, as `apply_rope` does."""
    if out.dtype != cos.dtype:
        work = torch.empty(out.shape, dtype=cos.dtype, device=out.device)
        return out.copy_(rotate_into(work, x, cos, sin, adjoint=adjoint))
    o1, o2 = out.chunk(2, dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    s1, s2 = sin.chunk(2, dim=-1)
    # x * cos over whole rows: one pass that reads each row of x once (the halves apart read
    # every strided row of the fused projection twice), then three operations in all, not four.
    torch.mul(x, cos, out=out)
    o1.addcmul_(x2, s2 if adjoint else s1, value=1 if adjoint else -1)
    o2.addcmul_(x1, s1 if adjoint else s2, value=-1 if adjoint else 1)
    return out


def to_heads(rows: Tensor, head_dim: int) -> Tensor:
    """(B, T, heads * Q) rows of the fused projection as a (B, heads, T, Q) view."""
    B, T, _ = rows.shape
    return rows.view(B, T, -1, head_dim).transpose(1, 2)


class _SplitRopeSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fused, q_cos, q_sin, k_cos, k_sin, row_sizes, head_dim):
        q, k, v, value, gate = fused.split(row_sizes, dim=-1)
        # Rotated queries in the rows' (B, T, H, Q) order, seen as (B, H, T, Q): the order
        # palm.attention_autograd's multi-query tiles take without a copy.
        q_rotated = to_heads(torch.empty(q.shape, dtype=q.dtype, device=q.device), head_dim)
        q, k = to_heads(q, head_dim), to_heads(k, head_dim)  # (B, H, T, Q), (B, KH, T, Q)
        v = to_heads(v, head_dim)  # (B, KH, T, Q), a view of `fused`
        q = rotate_into(q_rotated, q, q_cos, q_sin, adjoint=False)
        k = rotate_into(torch.empty_like(k), k, k_cos, k_sin, adjoint=False)
        swish = F.silu(gate)  # PaLM §2: Swish(xW) * (xV)
        ctx.save_for_backward(fused, swish, q_cos, q_sin, k_cos, k_sin)
        ctx.row_sizes, ctx.head_dim = row_sizes, head_dim
        return q, k, v, swish * value

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v, grad_hidden):
        fused, swish, q_cos, q_sin, k_cos, k_sin = ctx.saved_tensors
        grad = torch.empty_like(fused)  # (B, T, rows): in_proj's output gradient, filled in place
        q_rows, k_rows, v_rows, value_rows, gate_rows = grad.split(ctx.row_sizes, dim=-1)
        value, gate = fused.split(ctx.row_sizes, dim=-1)[3:]
        # (Autograd hands zeros, not None, for an output that got no gradient.)
        rotate_into(to_heads(q_rows, ctx.head_dim), grad_q, q_cos, q_sin, adjoint=True)
        rotate_into(to_heads(k_rows, ctx.head_dim), grad_k, k_cos, k_sin, adjoint=True)
        to_heads(v_rows, ctx.head_dim).copy_(grad_v)
        torch.mul(grad_hidden, swish, out=value_rows)
        # d/dgate of Swish(gate) * value: aten's one-pass Swish derivative, written in place.
        torch.ops.aten.silu_backward.grad_input(grad_hidden * value, gate, grad_input=gate_rows)
        return grad, None, None, None, None, None, None


def split_rope_swiglu(
    fused: Tensor, rope: RotaryTables, row_sizes: tuple[int, ...], head_dim: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused input projection's output (B, T, q | k | v | value | gate) to rotated
    q (B, H, T, Q), rotated k and v (B, KH, T, Q) and the SwiGLU hidden (B, T, ffn_hidden):
    the same values and gradients as split, `apply_rope` and `F.silu(gate) * value`."""
    return _SplitRopeSwiGLU.apply(fused, *rope, tuple(row_sizes), head_dim)
