"""Which CPU kernel computes the fused loss's logits block (palm.loss.linear_lm_loss).

The block is `h @ w.T`: a (rows, D) chunk of final activations against the (V, D) output
projection. aten's `mm` runs it through MKL's sgemm; oneDNN's linear kernel
(`torch.ops.mkldnn._linear_pointwise`, what Inductor calls for CPU linears) computes the same
product. On the 2-core AVX2 EPYC this project is measured on (issue 16, benchmarks/RESULTS.md,
"oneDNN logits"), 512-row blocks, medians of 12 interleaved calls:

    D x V            4 MiB    8 MiB    16 MiB   32 MiB   64 MiB   (the block's float32 bytes)
    oneDNN / MKL     1.12x    1.49x    1.45x    0.95-1.09x  0.61x (speed)

so oneDNN serves blocks up to 16 MiB (palm-s's 512 x 8192 among them) and MKL larger ones. Only
float32 CPU tensors of plain type, contiguous: oneDNN's bf16 path and other devices were not
measured, and fake tensors (dry runs) or DTensors keep `mm`.
"""

from __future__ import annotations

import torch
from torch import Tensor

ONEDNN_MAX_BLOCK_BYTES = 16 << 20


def onednn_logits_serve(h: Tensor, w: Tensor, rows: int) -> bool:
    """Whether oneDNN (`logits_block`) computes the chunks of `rows` rows of h (N, D) @ w.T."""
    return (
        type(h) is Tensor
        and type(w) is Tensor
        and h.is_cpu
        and h.dtype == w.dtype == torch.float32
        and h.is_contiguous()
        and w.is_contiguous()
        and rows * w.shape[0] * 4 <= ONEDNN_MAX_BLOCK_BYTES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def logits_block(h: Tensor, w: Tensor, out: Tensor | None) -> Tensor:
    """h (c, D) @ w (V, D).T: a new block by oneDNN's linear kernel where `out` is None (where
    `onednn_logits_serve`), else written into `out` (c, V), whose dtype may be wider than h's."""
    if out is None:
        return torch.ops.mkldnn._linear_pointwise(h, w, None, "none", [], "")
    if out.dtype == h.dtype:
        return torch.mm(h, w.t(), out=out)
    return out.copy_(torch.mm(h, w.t()))
