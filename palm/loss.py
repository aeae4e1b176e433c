"""PaLM's training loss (§5 "Loss function"): mean cross-entropy plus the auxiliary z-loss.

z-loss = coef * log(Z)^2, with Z the softmax normaliser, pushes log Z towards 0 for stability
(the paper: coef 1e-4). No label smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100  # targets with this value (padding) are left out of both terms


@dataclass
class LossOutput:
    loss: Tensor  # cross_entropy + z_loss: what is differentiated
    cross_entropy: Tensor  # mean negative log-likelihood per target token (nats)
    z_loss: Tensor  # coef * mean(log(Z)^2), already multiplied by its coefficient
    n_tokens: Tensor  # number of targets that counted


def lm_loss(
    logits: Tensor, targets: Tensor, z_loss_coef: float = 1e-4, ignore_index: int = IGNORE_INDEX
) -> LossOutput:
    """Loss for logits (..., V) against integer targets (...).

    log Z is computed once and reused: cross-entropy = log Z - logit[target]. Done in float32
    whatever the logits' dtype (bf16 logits lose too much in the log-sum-exp).
    """
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)  # (...)
    valid = targets != ignore_index
    safe_targets = targets.masked_fill(~valid, 0)
    target_logit = logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    weights = valid.to(logits.dtype)
    n_tokens = weights.sum()
    denominator = n_tokens.clamp(min=1.0)
    cross_entropy = ((log_z - target_logit) * weights).sum() / denominator
    z_loss = z_loss_coef * (log_z.square() * weights).sum() / denominator
    return LossOutput(cross_entropy + z_loss, cross_entropy, z_loss, n_tokens)
