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


class _NLLAndLogZ(torch.autograd.Function):
    """Per-token -log p(target) and log Z from (N, V) logits, with one (N, V) pass each way.

    The (N, V) tensors dominate the loss's cost at large vocabularies (32k: 260 MB per copy at
    2048 tokens), so forward is one fused log_softmax (saved for backward, as autograd would)
    and backward writes the gradient into one new buffer, where logsumexp + gather in autograd
    took several passes and (N, V) temporaries (zeros for the gather's backward among them).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        log_probs = torch.log_softmax(logits, dim=-1)  # (N, V)
        index = targets.unsqueeze(-1)  # (N, 1)
        target_log_prob = log_probs.gather(-1, index).squeeze(-1)  # (N,)
        # log p_t = x_t - log Z for any column t, so log Z = x_t - log p_t: as exact in float32
        # as computing it directly (both round at the scale of the larger term).
        log_z = logits.gather(-1, index).squeeze(-1) - target_log_prob
        ctx.save_for_backward(log_probs, index)
        return -target_log_prob, log_z

    @staticmethod
    def backward(ctx, grad_nll: Tensor, grad_log_z: Tensor) -> tuple[Tensor, None]:
        log_probs, index = ctx.saved_tensors
        # d(-log p_t)/dx = softmax - onehot(t);  d(log Z)/dx = softmax.
        grad = log_probs.exp()  # (N, V) softmax, the one new buffer
        grad.mul_((grad_nll + grad_log_z).unsqueeze(-1))
        grad.scatter_add_(-1, index, -grad_nll.unsqueeze(-1))
        return grad, None


def lm_loss(
    logits: Tensor, targets: Tensor, z_loss_coef: float = 1e-4, ignore_index: int = IGNORE_INDEX
) -> LossOutput:
    """Loss for logits (..., V) against integer targets (...).

    log Z is computed once and reused: cross-entropy = log Z - logit[target]. Done in float32
    whatever the logits' dtype (bf16 logits lose too much in the log-sum-exp).
    """
    logits = logits.float()
    valid = targets != ignore_index
    safe_targets = targets.masked_fill(~valid, 0)
    nll, log_z = _NLLAndLogZ.apply(logits.reshape(-1, logits.shape[-1]), safe_targets.reshape(-1))
    weights = valid.reshape(-1).to(logits.dtype)  # (N,): 0 for ignored targets
    n_tokens = weights.sum()
    denominator = n_tokens.clamp(min=1.0)
    cross_entropy = (nll * weights).sum() / denominator
    z_loss = z_loss_coef * (log_z.square() * weights).sum() / denominator
    return LossOutput(cross_entropy + z_loss, cross_entropy, z_loss, n_tokens)
