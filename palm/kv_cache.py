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

from palm.cpu_kernels import ONEDNN_DECODE_ROWS, onednn_available
from palm.errors import ConfigError
from palm.profiling import available_memory_bytes


@dataclass(frozen=True)
class TransposedWeights:
    """(in, out) copies of a model's wide weights, for decoding (`PaLM.transposed_weights`)."""

    in_proj: list[Tensor]  # per layer (d_model, in_proj rows)
    output: Tensor  # (d_model, vocab): the (tied) output projection


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
    # Copies of the two wide weights laid out (in, out), made once per cache where they pay
    # (transposed_weights_pay, below): a one-row matmul against (in, out) streams the
    # weight ~2x faster on CPU than against nn.Linear's (out, in) when in < out (short dot
    # products), and decoding is those matmuls (benchmarks/RESULTS.md, "transposed weights").
    # Shared, read-only: several caches (palm serve's batches) may hold the same copies.
    transposed: TransposedWeights | None = None

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

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


def transposed_weights_pay(model: nn.Module, batch_size: int | None = None) -> bool:
    """Whether decoding with (in, out) copies of the wide weights (`PaLM.new_cache`) is faster,
    for a palm.model.PaLM, decoding `batch_size` sequences (None: any number, as a server).

    Measured on CPU in float32 only (one-row matmuls ~2x faster against (in, out) when in < out:
    benchmarks/RESULTS.md, "transposed weights"); elsewhere (CUDA, bf16, where a bf16 `a @ b`
    can be 20x slower than `a @ b.T` on CPUs without AVX512-BF16) nothing was measured, and the
    copies would be memory for nothing. Sharded weights (DTensor: FSDP2, tensor parallelism)
    and a replaced output projection (palm.parallel) keep their own paths. Nor where the copies
    would take more than half the memory the machine has available: a speed-up, never an OOM.
    Nor for 4-64 sequences, whose steps oneDNN computes faster from nn.Linear's own layout
    (palm.cpu_kernels; the copies' memory would buy nothing).
    """
    weight = model.output_weight
    if not (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and type(weight.data) is torch.Tensor
        and "output_logits" not in vars(model)
    ):
        return False
    if batch_size in ONEDNN_DECODE_ROWS and onednn_available():
        return False
    copies = sum(b.in_proj.weight.numel() for b in model.blocks) + weight.numel()
    available = available_memory_bytes()
    return available is None or copies * weight.element_size() <= available // 2


def transposed_copies(
    model: nn.Module,
    wanted: bool | TransposedWeights | None = None,
    batch_size: int | None = None,
) -> TransposedWeights | bool:
    """Decoding's (in, out) weight copies as `wanted` says, or False for none: given copies as
    they are, new ones for True, and for None where they pay (`transposed_weights_pay`) for
    `batch_size` sequences (None: any number). One set may serve many caches (a server, an
    interactive session, an evaluation loop)."""
    if wanted is None:
        wanted = transposed_weights_pay(model, batch_size)
    return model.transposed_weights() if wanted is True else wanted


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
