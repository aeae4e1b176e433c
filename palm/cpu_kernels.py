"""Where oneDNN's matmul kernel is faster on CPU than aten's (MKL's) for the same product, and
one-row products split into per-thread pieces (`pieces_product`).

`x @ w.T` of float32 activations against an (out, in) weight: aten's `mm` runs MKL's sgemm;
oneDNN's linear kernel (`torch.ops.mkldnn._linear_pointwise`, what Inductor calls for CPU
linears) takes the same dense tensors. Measured on the 2-core AVX2 EPYC this project runs on
(issue 16, benchmarks/RESULTS.md, "oneDNN"), medians of interleaved calls:

- the fused loss's logits block (512 rows x V): oneDNN 1.12-1.49x MKL's speed for blocks of up
  to 16 MiB (palm-s's 512 x 8192), 0.61-1.09x above, so `logits_block` takes it only there;
- decoding, 4-64 rows (one-token steps of 4-64 sequences) against the wide weights (in_proj,
  the output projection): 1.0-1.5x the best of MKL's two layouts (nn.Linear's and the (in, out)
  copies of palm.kv_cache.TransposedWeights), and whole decoding 1.13-1.39x at batch 4-8; at 1-3
  rows the copies stay faster (and faster again in per-thread pieces, `pieces_product`), and
  at 2048 rows (training) the two kernels are alike;
- decoding from weights packed once into oneDNN's blocked layout (`onednn_pack`, what Inductor's
  freezing does): every weight of a step: its matmuls 1.2-2.1x faster at 2-64 rows (the unpacked
  kernels reorder the weight in every call) and about even with the (in, out) copies at one.

Only plain contiguous float32 CPU tensors: oneDNN's bf16 and other devices were not measured,
and fake tensors (dry runs) or DTensors keep aten's ops; so does code under torch.compile
(Inductor failed to lower the op in the compiled decoding step), but for packed weights, whose
products it keeps as calls of the custom op `palm::onednn_packed_linear`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

ONEDNN_MAX_BLOCK_BYTES = 16 << 20
ONEDNN_DECODE_ROWS = range(4, 65)
ONEDNN_PACKED_ROWS = range(1, 65)  # the rows a packed weight (onednn_pack) is used for
ONEDNN_PACK_HINT = 8  # the rows oneDNN picks the packed layout for; it serves 1-64 alike
PLAIN = (Tensor, torch.nn.Parameter)  # not DTensor, not a fake tensor


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_serves(x: Tensor, w: Tensor) -> bool:
    """Whether oneDNN's kernel can take x (..., in) @ w (out, in).T as they are."""
    return (
        type(x) in PLAIN
        and type(w) in PLAIN
        and x.is_cpu
        and x.dtype == w.dtype == torch.float32
        and x.is_contiguous()
        and w.is_contiguous()
        and not torch.compiler.is_compiling()  # compiled code keeps aten's ops (Inductor's)
        and onednn_available()
    )


def onednn_logits_serve(h: Tensor, w: Tensor, rows: int) -> bool:
    """Whether oneDNN (`logits_block`) computes the chunks of `rows` rows of h (N, D) @ w.T."""
    return rows * w.shape[0] * 4 <= ONEDNN_MAX_BLOCK_BYTES and onednn_serves(h, w)


def onednn_decodes(x: Tensor, w: Tensor) -> bool:
    """Whether a decoding forward's x (B, T, in) @ w (out, in).T goes through oneDNN."""
    return (
        x.numel() // x.shape[-1] in ONEDNN_DECODE_ROWS
        and onednn_serves(x, w)
        and decoding_serves(x, w)
    )


def decoding_serves(x: Tensor, w: Tensor, compiled: bool = False) -> bool:
    """Whether a decoding product x (..., in) @ w.T (w the model's weight, or read from a packed
    copy of it, `onednn_pack`) may run in oneDNN or in per-thread pieces: plain CPU float32 x,
    outside CPU autocast (whose linears run in its dtype) and autograd (oneDNN's op has no
    gradient: backward would silently give none); outside torch.compile too, but for products
    `compiled` code runs as intended (packed weights' opaque custom op
    `palm::onednn_packed_linear`, Inductor's one-row reduction of `pieces_product`)."""
    return (
        type(x) in PLAIN
        and type(w) in PLAIN
        and x.is_cpu
        and x.dtype == torch.float32
        and (compiled or not torch.compiler.is_compiling())
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    )


def onednn_pack(w: Tensor) -> Tensor:
    """A copy of w (out, in) in oneDNN's blocked layout, for `onednn_linear` (an opaque
    `torch._mkldnn` tensor, w's size). Packed once, a step of 2-64 rows skips the reordering
    oneDNN (and MKL) do to the weight in every call: decoding 1.4-1.6x faster."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), ONEDNN_PACK_HINT)


def onednn_linear(x: Tensor, w: Tensor) -> Tensor:
    """x (..., in) @ w (out, in).T by oneDNN's linear kernel; w plain, or packed (under
    torch.compile through `palm::onednn_packed_linear`, a call Inductor keeps as it is)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if torch.compiler.is_compiling():
        out = _packed_linear_op(rows, w, w.shape[0])
    else:
        out = torch.ops.mkldnn._linear_pointwise(rows, w, None, "none", [], "")
    return out.view(*x.shape[:-1], w.shape[0])


@torch.library.custom_op("palm::onednn_packed_linear", mutates_args=())
def _packed_linear_op(rows: Tensor, packed: Tensor, out_features: int) -> Tensor:
    """rows (n, in) @ a packed weight (`onednn_pack`).T, opaque to torch.compile: a compiled
    decoding step of 2-64 sequences takes the packed copies too (benchmarks/RESULTS.md)."""
    return torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")


@_packed_linear_op.register_fake
def _packed_linear_shape(rows: Tensor, packed: Tensor, out_features: int) -> Tensor:
    return rows.new_empty(rows.shape[0], out_features)


def one_row_pieces(out_features: int, threads: int | None = None) -> int:
    """How many column pieces a one-row product against `out_features` outputs splits into
    (`pieces_product`): one per thread (torch's by default), or the most up to that which
    divide it."""
    return _most_pieces(out_features, threads or torch.get_num_threads())


@functools.cache  # asked for every eager one-row product: the search runs once per shape
def _most_pieces(out_features: int, threads: int) -> int:
    return max(p for p in range(1, threads + 1) if out_features % p == 0)


def weight_pieces(w: Tensor, pieces: int) -> Tensor:
    """w (out, in) as `pieces` (in, out / pieces) matrices (a view: each piece's rows, as its
    transpose), for `pieces_product`."""
    return w.view(pieces, w.shape[0] // pieces, w.shape[1]).transpose(1, 2)


def pieces_product(x: Tensor, pieces: Tensor) -> Tensor:
    """x (..., in) @ a weight given as (P, in, out / P) column pieces: one batched matmul,
    which runs each piece's product on a thread of its own.

    A one-row product streams its weight from memory once; MKL runs one row (sgemv, or sgemm
    of one row) on fewer threads than the machine has, so it read M's decoding weights at
    11-19 GB/s where a sum reads 25-28 with both threads of the 2-core CPU. Split into
    per-thread pieces, one row read them at 22-26 GB/s: (in, out) pieces of in_proj and the
    output projection, contiguous (`palm.kv_cache.transposed`), and for the out projections
    (in > out) views of nn.Linear's own layout (`weight_pieces`) (benchmarks/RESULTS.md,
    "one-row products in per-thread pieces").

    Under torch.compile a one-row batched matmul is not a call: Inductor lowers it on CPU to
    its own parallel reduction (mul + sum), which reads a view of nn.Linear's layout
    (`weight_pieces(w, 1)`, the reduction over contiguous rows) at 24-25 GB/s, no copy needed,
    and (in, out) pieces at a third of that (benchmarks/RESULTS.md)."""
    P, d_in, width = pieces.shape
    rows = x.reshape(1, -1, d_in)
    out = torch.matmul(rows.expand(P, rows.shape[1], d_in), pieces)  # (P, n, width)
    return out.transpose(0, 1).reshape(*x.shape[:-1], P * width)  # one row: a view


def logits_block(h: Tensor, w: Tensor, out: Tensor | None) -> Tensor:
    """h (c, D) @ w (V, D).T: a new block by oneDNN's linear kernel where `out` is None (where
    `onednn_logits_serve`), else written into `out` (c, V), whose dtype may be wider than h's."""
    if out is None:
        return onednn_linear(h, w)
    if out.dtype == h.dtype:
        return torch.mm(h, w.t(), out=out)
    return out.copy_(torch.mm(h, w.t()))
