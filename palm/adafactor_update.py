"""The arithmetic of one PaLM Adafactor step (PaLM §5; T5X's update, palm.optim's docstring) on
lists of float32 tensors, in two forms: multi-tensor eager (torch._foreach_*), and one function
for torch.compile to fuse (train.compile). palm.optim.PaLMAdafactor owns the state and picks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def foreach_update_(
    group: dict[str, Any],
    beta2: float,
    decay: float,
    p32: list[Tensor],
    g32: list[Tensor],
    v: list[Tensor],
    m: list[Tensor] | None,
    numel_sqrt: list[float],
    global_norms: Callable[..., list[list[Tensor] | None]] | None = None,
) -> None:
    """The update with the hyperparameters of `group`, beta2_k and the decay rate; p32, v and m
    in place. `global_norms` turns local shards' norms into whole-tensor norms (DTensors)."""
    lr = float(group["lr"])
    beta1, eps2, d = group["beta1"], group["eps2"], group["clip_threshold"]
    scaled = group["multiply_by_parameter_scale"]

    # v = beta2 v + (1 - beta2)(g^2 + eps1): in place, no g^2 temporaries.
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g32, g32, value=1.0 - beta2)
    torch._foreach_add_(v, (1.0 - beta2) * group["eps1"])
    # u = g / sqrt(v): the one new buffer per tensor.
    u = torch._foreach_rsqrt(v)
    torch._foreach_mul_(u, g32)

    # Per-tensor norms as 0-D tensors on their device (no host sync); p is still the old p.
    p_norm = torch._foreach_norm(p32) if scaled else None
    u_norm = torch._foreach_norm(u) if d is not None else None
    if global_norms is not None:
        p_norm, u_norm = global_norms(p_norm, u_norm)

    # Step size per tensor, lr * max(RMS(p), eps2) / max(1, RMS(u) / d): computed on one
    # stacked vector (a few kernels, not several per tensor), then one factor per tensor.
    device = p32[0].device
    sizes = torch.tensor(numel_sqrt, dtype=torch.float32).to(device, non_blocking=True)
    if scaled:
        scale = (torch.stack(p_norm).float() / sizes).clamp_(min=eps2).mul_(lr)
    else:
        scale = torch.full((len(p32),), lr, dtype=torch.float32, device=device)
    if d is not None:  # Adafactor update clipping
        scale /= (torch.stack(u_norm).float() / (sizes * d)).clamp_(min=1.0)
    scale = list(scale.unbind())
    torch._foreach_mul_(u, scale)  # u is now the scaled update s

    if m is not None:  # m = beta1 m + (1 - beta1) u, one pass
        torch._foreach_lerp_(m, u, 1.0 - beta1)
        u = m
    if decay != 0.0:
        torch._foreach_mul_(p32, 1.0 - decay)  # decoupled: (1 - wd) p, from the old p as in T5X
    torch._foreach_sub_(p32, u)


def fused_update_(
    p: list[Tensor],
    g: list[Tensor],
    v: list[Tensor],
    m: list[Tensor],
    scalars: Tensor,
    numel_sqrt: list[float],
    *,
    eps1: float,
    eps2: float,
    beta1: float,
    clip_threshold: float | None,
    scaled: bool,
) -> None:
    """The T5X update (palm.optim's docstring), tensor by tensor, p, v and m in place; written
    for torch.compile, which fuses each tensor's update into two passes (v, u and the two RMS
    reductions; then m and p). `scalars` holds (beta2_k, lr, decay rate); m is [] without
    momentum. Eagerly it is correct but slow (it makes temporaries): PaLMAdafactor runs it
    compiled only (compiled=True)."""
    beta2, lr, decay = scalars[0], scalars[1], scalars[2]
    for i in range(len(p)):
        v_new = beta2 * v[i] + (1.0 - beta2) * (g[i] * g[i] + eps1)
        v[i].copy_(v_new)
        u = g[i] * torch.rsqrt(v_new)
        step = lr
        if scaled:  # lr * max(RMS(p), eps2), from the old p
            step = step * torch.clamp(torch.linalg.vector_norm(p[i]) / numel_sqrt[i], min=eps2)
        if clip_threshold is not None:  # Adafactor update clipping
            rms_u = torch.linalg.vector_norm(u) / numel_sqrt[i]
            step = step / torch.clamp(rms_u / clip_threshold, min=1.0)
        update = u * step
        if m:  # m = beta1 m + (1 - beta1) s
            update = m[i] * beta1 + update * (1.0 - beta1)
            m[i].copy_(update)
        p[i].copy_(p[i] * (1.0 - decay) - update)
