"""Rotary position embedding (Su et al. 2021; PaLM §2 "RoPE embeddings"), and xPos.

Pure functions of positions: the cos/sin tables every layer shares, and the rotation of
queries and keys by them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from palm.config import ModelConfig


def rope_angles(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin tables (T, head_dim) for integer positions (T,), in float32.

    Frequencies are laid out in two halves ("rotate half", as GPT-NeoX and PaLM-pytorch do):
    dimension i pairs with dimension i + head_dim/2.
    """
    inv_freq = 1.0 / base ** (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., T, head_dim) by the position angles; cos/sin are (T, head_dim).

    Computed in the tables' precision (float32) and returned in x's dtype: under bf16 autocast
    q and k stay bf16, so attention gets q, k, v of one dtype and never copies the one shared
    key/value head to cast it (which would undo multi-query attention's saving)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = x * cos + rotated * sin
    return out if out.dtype == x.dtype else out.to(x.dtype)


def xpos_scales(positions: Tensor, head_dim: int, scale_base: float, center: int) -> Tensor:
    """xPos factors (T, head_dim) (Sun et al. 2022): zeta_i ** ((n - center) / scale_base).

    zeta_i = (2i + 0.4 d) / 1.4 d per frequency pair, laid out in halves like `rope_angles`.
    Queries are multiplied by these, keys divided, so q.k decays with the distance n - m only;
    `center` cancels and just keeps the factors near 1 (float range), as palm-rlhf-pytorch does
    with seq_len // 2.
    """
    zeta = (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) + 0.4 * head_dim
    ) / (1.4 * head_dim)
    power = (positions.to(torch.float32) - center) / scale_base  # (T,)
    scale = zeta[None, :] ** power[:, None]  # (T, head_dim/2)
    return torch.cat((scale, scale), dim=-1)


class RotaryTables(NamedTuple):
    """cos/sin tables (T, head_dim) for queries and for keys. Plain RoPE (PaLM) uses the same
    two for both; xPos scales the queries' by s and divides the keys' by s."""

    q_cos: Tensor
    q_sin: Tensor
    k_cos: Tensor
    k_sin: Tensor


def rotary_tables(positions: Tensor, config: ModelConfig, dtype: torch.dtype) -> RotaryTables:
    """The tables every layer shares for these positions (computed in float32, then cast)."""
    cos, sin = rope_angles(positions, config.head_dim, config.rope_base)
    if not config.xpos_scale_base:
        cos, sin = cos.to(dtype), sin.to(dtype)
        return RotaryTables(cos, sin, cos, sin)
    s = xpos_scales(positions, config.head_dim, config.xpos_scale_base, config.max_seq_len // 2)
    tables = (cos * s, sin * s, cos / s, sin / s)
    return RotaryTables(*(t.to(dtype) for t in tables))


def rotary_table_stack(length: int, config: ModelConfig, device=None) -> Tensor:
    """`rotary_tables` for positions 0..length-1 stacked into one (4, length, head_dim) float32
    tensor, in RotaryTables' order: what the model keeps as a buffer and slices per forward."""
    positions = torch.arange(length, device=device)
    return torch.stack(rotary_tables(positions, config, torch.float32))
