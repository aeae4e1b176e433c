"""The key/value cache for incremental decoding, preallocated once to its full length.

Written in place step by step, either at `length` (eager decoding: views of the filled part) or
at a position given as a tensor (the static-shape step that torch.compile turns into one graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.torch_version import TorchVersion

from palm.cpu_kernels import (
    ONEDNN_DECODE_ROWS,
    ONEDNN_PACKED_ROWS,
    decoding_serves,
    one_row_pieces,
    onednn_available,
    onednn_decodes,
    onednn_linear,
    onednn_pack,
    pieces_product,
    weight_pieces,
)
from palm.errors import ConfigError
from palm.profiling import available_memory_bytes


@dataclass(frozen=True)
class TransposedWeights:
    """(in, out) copies of a model's wide weights, for decoding (`transposed_weights`)."""

    # Per layer (d_model, in_proj rows); for one sequence (`one_row`) per-thread column pieces
    # (P, d_model, rows / P) instead, P = cpu_kernels.one_row_pieces(rows), for pieces_product.
    in_proj: list[Tensor]
    output: Tensor  # (d_model, vocab): the (tied) output projection; pieces likewise

    @property
    def one_row(self) -> bool:
        return self.output.dim() == 3


@dataclass(frozen=True)
class PackedWeights:
    """Every weight a decoding step multiplies by, in oneDNN's own blocked layout (opaque
    `torch._mkldnn` tensors, `packed_weights`): CPU float32 steps of 1-64 rows, eager or
    compiled (palm::onednn_packed_linear)."""

    in_proj: list[Tensor]  # per layer
    attn_out: list[Tensor]
    mlp_out: list[Tensor]
    output: Tensor


WeightCopies = TransposedWeights | PackedWeights
WIDE = ("in_proj", "output")  # the weights with (in, out) copies, and oneDNN's plain route


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, preallocated to `max_len`.

    Under multi-query attention each layer stores one head: (B, 1, max_len, head_dim), which is
    what makes PaLM's decoding cheap (PaLM §2 "Multi-Query Attention").
    """

    keys: list[Tensor]  # per layer: (B, n_kv_heads, max_len, head_dim)
    values: list[Tensor]
    length: int = 0  # tokens already stored
    # (B, max_len) bool, False at left-padding of batched prompts of different lengths: those
    # keys are never attended. RoPE is relative, so a row's shifted positions change nothing.
    key_mask: Tensor | None = None
    # RoPE tables for positions 0 .. max_len - 1, made once: each step slices or indexes them
    # instead of recomputing angles (no per-token cos/sin, no per-token allocation).
    rope: tuple[Tensor, ...] | None = None  # a palm.rope.RotaryTables
    # Copies of the weights in a layout decoding multiplies by faster, made where they pay
    # (weight_copies_pay, below); decoding is these matmuls. (in, out) copies of the two wide
    # weights: a one-row matmul against them streams the weight ~2x faster on CPU than against
    # nn.Linear's (out, in) when in < out (benchmarks/RESULTS.md, "transposed weights"), and
    # faster again in per-thread pieces ("one-row products in per-thread pieces"). Or oneDNN's
    # packed layout of all four, decoding 1.4-1.6x faster again at 2-64 rows ("packed
    # weights"). Shared, read-only: several caches (palm serve's batches) may hold the same
    # copies.
    transposed: TransposedWeights | None = None
    packed: PackedWeights | None = None

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def one_row(self) -> bool:
        """Whether one-row steps multiply by per-thread pieces of the copies."""
        return self.transposed is not None and self.transposed.one_row

    def hold(self, copies: WeightCopies | None) -> None:
        """Decode with these weight copies (None: with the model's own weights)."""
        self.transposed = copies if isinstance(copies, TransposedWeights) else None
        self.packed = copies if isinstance(copies, PackedWeights) else None

    def product(
        self, x: Tensor, weight: Tensor, name: str, layer: int = 0, rows: slice | None = None
    ) -> Tensor | None:
        """x (..., in) @ weight.T, where `weight` is the model's `name` weight of `layer` (its
        `rows` where given), by decoding's faster kernel for it: oneDNN's packed copy, oneDNN
        from nn.Linear's layout (4-64 rows), the (in, out) copy or its per-thread pieces
        (`one_row`); for one row, out projections in pieces of their own layout, and compiled,
        Inductor's reduction over every weight's own layout. None: the module's own op."""
        n = x.numel() // x.shape[-1]
        if n == 1 and torch.compiler.is_compiling() and decoding_serves(x, weight, compiled=True):
            return pieces_product(x, weight_pieces(weight, 1))  # Inductor's reduction, no copy
        if n == 1 and name not in WIDE and decoding_serves(x, weight):
            # An out projection (in > out), whatever copies the cache holds: nn.Linear's own
            # layout in per-thread pieces, 1.5x its packed copy per product (RESULTS.md).
            return pieces_product(x, weight_pieces(weight, one_row_pieces(weight.shape[0])))
        if self.packed is not None and rows is None and n in ONEDNN_PACKED_ROWS:
            if decoding_serves(x, weight, compiled=True):
                packed = getattr(self.packed, name)
                return onednn_linear(x, packed if name == "output" else packed[layer])
        if name not in WIDE:
            return None
        if onednn_decodes(x, weight):
            return onednn_linear(x, weight)
        if self.transposed is None or not decoding_serves(x, weight, compiled=True):
            return None  # (the copies are detached, and float32: not for autograd, autocast)
        copy = self.transposed.output if name == "output" else self.transposed.in_proj[layer]
        if self.one_row:  # (made for the parallel block, whose products take no row slices)
            return pieces_product(x, copy) if rows is None else None
        return x @ (copy if rows is None else copy[:, rows])

    def restart(self, prompt_mask: Tensor | None = None) -> None:
        """Empty the cache for a new request of (B, T) `prompt_mask` (None: no padding), keeping
        every buffer at its address (a recorded CUDA graph reads them there). The stale keys and
        values after `length` are never attended: they lie after every query's position."""
        if (prompt_mask is None) != (self.key_mask is None):
            raise ConfigError("restart: a padded prompt needs a cache made with a key mask, and "
                             "only a padded prompt may use one")  # fmt: skip
        self.length = 0
        if prompt_mask is not None:
            self.key_mask.fill_(True)
            self.key_mask[:, : prompt_mask.shape[1]] = prompt_mask

    def store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's k, v (B, KH, T, Q) after the stored ones; return all of them."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def store_at(self, layer: int, position: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, KH, 1, Q) at `position` (1,); return the whole (B, KH, max_len, Q)
        buffers. Shapes never depend on the position: one compiled graph serves every step."""
        # An indexed write (index_put_), which inductor performs in place in the input buffer.
        self.keys[layer][:, :, position] = k
        self.values[layer][:, :, position] = v
        return self.keys[layer], self.values[layer]


def cache_dtype(weight_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The cache's dtype: autocast's where autocast is on (keys and values are made in it, so
    a float32 cache would hold the same values at twice the bytes, and attention would cast the
    whole of it back at every step), else the weights'."""
    # The meta device has no autocast (is_autocast_enabled would raise for it).
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight_dtype


def weight_copies_pay(
    model: nn.Module, batch_size: int | None = None, compiled: bool = False
) -> type[TransposedWeights] | type[PackedWeights] | None:
    """Which decoding weight copies (`new_cache`) make a palm.model.PaLM decode `batch_size`
    sequences (None: any number, as a server) faster, if any; `compiled`: for steps under
    torch.compile.

    Measured on CPU in float32 only (benchmarks/RESULTS.md): for one sequence the (in, out)
    copies (one-row matmuls ~2x faster than against (out, in) when in < out), in per-thread
    pieces (faster again: `cpu_kernels.pieces_product`); for 2-64 (and a
    server's any number) oneDNN's packed layout of every weight, 1.4-1.6x faster again at 2-64
    rows; above 64, the (in, out) copies as before; where the packed set would not fit, the
    (in, out) one. Compiled steps (torch 2.13 on, where tested) take the packed ones for 2-64
    too, as a custom op Inductor keeps, and (in, out) copies where eager takes none (oneDNN
    from nn.Linear's layout is not for compiled code) or for any batch (None: a compiled
    decoder); none for one sequence, whose one-row products Inductor lowers to its own
    reduction over nn.Linear's layout (`KVCache.product`; measured on torch 2.13). Elsewhere
    (CUDA, bf16, where a bf16 `a @ b` can be 20x slower than `a @ b.T` on CPUs without
    AVX512-BF16) nothing was measured, and the copies would be memory for nothing.
    Sharded weights (DTensor: FSDP2, tensor parallelism) and a replaced output projection
    (palm.parallel) keep their own paths. Nor where the copies would take more than half the
    memory the machine has available: a speed-up, never an OOM.
    """
    weight = model.output_weight
    if not (cpu_float32(weight) and "output_logits" not in vars(model)):
        return None
    available = available_memory_bytes()
    in_proj = sum(b.in_proj.weight.numel() for b in model.blocks)
    out = sum(b.attn_out.weight.numel() + b.mlp_out.weight.numel() for b in model.blocks)
    sizes = {
        TransposedWeights: in_proj + weight.numel(),
        PackedWeights: in_proj + out + weight.numel(),
    }
    for pack in (True, False):  # where the packed set does not fit, the (in, out) one may
        kind = copies_kind(model, batch_size, compiled, pack)
        if kind is None:
            return None
        if available is None or sizes[kind] * weight.element_size() <= available // 2:
            return kind
    return None


def copies_kind(
    model: nn.Module, batch_size: int | None, compiled: bool, pack: bool = True
) -> type[TransposedWeights] | type[PackedWeights] | None:
    """The faster copies for `batch_size` sequences (weight_copies_pay), memory aside;
    `pack=False`: the faster without packed ones."""
    if compiled and batch_size == 1:
        return None  # Inductor's one-row reduction over nn.Linear's layout (KVCache.product)
    if compiled and (batch_size is None or TorchVersion(torch.__version__) < "2.13"):
        return TransposedWeights  # any batch: one sequence's; packed graph inputs: from 2.13
    if pack and packable(model):
        if batch_size is None or batch_size in ONEDNN_PACKED_ROWS[1:]:  # one row: the copies
            return PackedWeights
    if batch_size in ONEDNN_DECODE_ROWS and onednn_available() and not compiled:
        return None  # oneDNN from nn.Linear's own layout; the copies would buy nothing
    return TransposedWeights


def packable(model: nn.Module) -> bool:
    """Whether `packed_weights` serves this model: CPU float32 plain weights, oneDNN built in,
    the parallel block (the serial ablation multiplies by in_proj's row slices)."""
    return model.config.parallel_block and onednn_available() and cpu_float32(model.output_weight)


def cpu_float32(weight: Tensor) -> bool:
    """A plain float32 CPU weight (not a DTensor shard: FSDP2 and tensor parallelism keep
    their own paths)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and type(weight.data) is torch.Tensor
    )


@torch.no_grad()
def transposed_weights(
    model: nn.Module, batch_size: int | None = None, compiled: bool = False
) -> TransposedWeights:
    """(in, out) copies of every in_proj and of the output projection, for decoding
    `batch_size` sequences (None: any number); for one sequence decoded eagerly (parallel
    block, CPU float32), in per-thread pieces (`TransposedWeights.one_row`)."""
    weight = model.output_weight
    one_row = (
        batch_size == 1 and not compiled and model.config.parallel_block and cpu_float32(weight)
    )

    def copy(w: Tensor) -> Tensor:
        return transposed(w, pieces=one_row_pieces(w.shape[0]) if one_row else None)

    return TransposedWeights([copy(b.in_proj.weight) for b in model.blocks], copy(weight))


def transposed(weight: Tensor, rows: int = 512, pieces: int | None = None) -> Tensor:
    """A contiguous (in, out) copy of weight (out, in), made `rows` of the weight at a time:
    each block's strided writes stay in the CPU's cache. The whole-matrix copy (`.t()
    .contiguous()`) took M's set 149 ms against 94 (benchmarks/RESULTS.md, "Issue 16: eager
    decoding in inference mode"), which one sequence's 128 new tokens paid at 4% of their time.
    `pieces`: (pieces, in, out / pieces) instead, each piece contiguous (`pieces_product`)."""
    out_features, in_features = weight.shape
    count = pieces or 1
    if out_features % count:
        raise ConfigError(f"transposed: {out_features} rows do not split into {pieces} pieces")
    width = out_features // count
    copy = weight.new_empty(count, in_features, width)
    for piece in range(count):
        for start in range(0, width, rows):
            block = weight[piece * width + start : piece * width + min(start + rows, width)]
            copy[piece, :, start : start + rows].copy_(block.t())
    return copy if pieces else copy[0]


@torch.no_grad()
def packed_weights(model: nn.Module) -> PackedWeights:
    """oneDNN's packed copies of in_proj, attn_out, mlp_out (per layer) and the output
    projection, for CPU float32 decoding (`packable` models), eager or compiled."""
    blocks = model.blocks
    return PackedWeights(
        [onednn_pack(b.in_proj.weight) for b in blocks],
        [onednn_pack(b.attn_out.weight) for b in blocks],
        [onednn_pack(b.mlp_out.weight) for b in blocks],
        onednn_pack(model.output_weight),
    )


def weight_copies(
    model: nn.Module,
    wanted: bool | WeightCopies | None = None,
    batch_size: int | None = None,
    compiled: bool = False,
) -> WeightCopies | bool:
    """Decoding's weight copies as `wanted` says, or False for none: given copies as they are,
    new ones for True (the kind that is faster for `batch_size` sequences, memory aside; for
    compiled one-row steps, which multiply by none, (in, out) copies only the prompt uses), and
    for None where they pay (`weight_copies_pay`) for `batch_size` sequences (None: any
    number). One set may serve many caches (a server, an interactive session, an evaluation
    loop). `compiled`: for torch.compile's steps."""
    if wanted is None:
        kind = weight_copies_pay(model, batch_size, compiled)
    elif wanted is True:
        kind = copies_kind(model, batch_size, compiled) or TransposedWeights
    else:
        return wanted
    if kind is PackedWeights:
        return packed_weights(model)
    return transposed_weights(model, batch_size, compiled) if kind is TransposedWeights else False


def padding_mask(key_mask: Tensor, past: int, T: int) -> Tensor:
    """(B, 1, T, past + T) mask: the causal one, minus padding keys (key_mask False).

    A padding query still sees itself, so no row is fully masked (which would give NaN that
    later layers would write into the cache).
    """
    key_pos = torch.arange(past + T, device=key_mask.device)
    query_pos = torch.arange(past, past + T, device=key_mask.device)
    causal = key_pos[None, :] <= query_pos[:, None]  # (T, past + T)
    keep = key_mask[:, None, None, : past + T] | (key_pos[None, :] == query_pos[:, None])
    return keep & causal  # (B, 1, T, past + T)


# cuDNN's attention builds an execution plan for every new shape. An eager decoding step has a
# new key length every token, so each layer paid for a plan each token: about 2 ms of CPU per
# call on an H200, and palm-350m decoded 17 tokens/s (benchmarks/RESULTS.md, "GPU check").
PLAN_FREE_BACKENDS = {
    SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
    SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
    SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
}


def one_token_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    """`F.scaled_dot_product_attention` for a decoding step of one new token, whose key length
    is new at every call: eager CUDA steps keep to the enabled backends that need no per-shape
    plan (cuDNN's does); the compiled static step (one shape for every token) lets SDPA choose.
    (The backend switch is process-wide for the call: decode from one thread at a time.)"""
    if q.is_cuda and not torch.compiler.is_compiling():
        backends = [backend for backend, enabled in PLAN_FREE_BACKENDS.items() if enabled()]
        if backends:
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal)
