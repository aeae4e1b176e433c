"""PaLM's training loss (§5 "Loss function"): mean cross-entropy plus the auxiliary z-loss.

z-loss = coef * log(Z)^2, with Z the softmax normaliser, pushes log Z towards 0 for stability
(the paper: coef 1e-4). No label smoothing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from palm.config import IGNORE_INDEX  # targets with this value are left out of both terms
from palm.cpu_kernels import logits_block, onednn_logits_serve
from palm.flops import chunk_tokens_for


class LossOutput(NamedTuple):
    """The loss and its parts. A NamedTuple so that DDP/FSDP/compile see the tensors inside."""

    loss: Tensor  # cross_entropy + z_loss: what is differentiated
    cross_entropy: Tensor  # mean negative log-likelihood per target token (nats)
    z_loss: Tensor  # coef * mean(log(Z)^2), already multiplied by its coefficient
    n_tokens: Tensor  # number of targets that counted


def perplexity_of(mean_nll: float) -> float:
    """exp(mean negative log-likelihood), clamped so a diverged loss gives a huge number, not an
    overflow."""
    return math.exp(min(mean_nll, 700.0))


def _nll_and_log_z(logits: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """log_softmax (N, V), -log p(target) (N,) and log Z (N,) from logits (N, V), index (N, 1)."""
    log_probs = torch.log_softmax(logits, dim=-1)
    return (log_probs, *_nll_and_log_z_from(logits, log_probs, index))


def _nll_and_log_z_from(logits: Tensor, log_probs: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """-log p(target) (N,) and log Z (N,) from the logits and their log_softmax (N, V).

    log p_t = x_t - log Z for any column t, so log Z = x_t - log p_t: as exact in float32 as
    computing it directly (both round at the scale of the larger term), and no second pass
    over the (N, V) block."""
    target_log_prob = log_probs.gather(-1, index).squeeze(-1)
    return -target_log_prob, logits.gather(-1, index).squeeze(-1) - target_log_prob


def _logits_grad_(softmax: Tensor, index: Tensor, grad_nll: Tensor, grad_log_z: Tensor) -> Tensor:
    """Gradient w.r.t. the logits, written over `softmax` (N, V), from those w.r.t. nll, log Z.

    d(-log p_t)/dx = softmax - onehot(t);  d(log Z)/dx = softmax.
    """
    softmax.mul_((grad_nll + grad_log_z).unsqueeze(-1))
    return softmax.scatter_add_(-1, index, -grad_nll.unsqueeze(-1))


class _NLLAndLogZ(torch.autograd.Function):
    """Per-token -log p(target) and log Z from (N, V) logits, with one (N, V) pass each way.

    The (N, V) tensors dominate the loss's cost at large vocabularies (32k: 260 MB per copy at
    2048 tokens), so forward is one fused log_softmax (saved for backward, as autograd would)
    and backward writes the gradient into one new buffer, where logsumexp + gather in autograd
    took several passes and (N, V) temporaries (zeros for the gather's backward among them).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        index = targets.unsqueeze(-1)  # (N, 1)
        log_probs, nll, log_z = _nll_and_log_z(logits, index)
        ctx.save_for_backward(log_probs, index)
        return nll, log_z

    @staticmethod
    def backward(ctx, grad_nll: Tensor, grad_log_z: Tensor) -> tuple[Tensor, None]:
        log_probs, index = ctx.saved_tensors
        # log_probs.exp(): the one new (N, V) buffer (the saved log_probs stay as they are).
        return _logits_grad_(log_probs.exp(), index, grad_nll, grad_log_z), None


def lm_loss(
    logits: Tensor, targets: Tensor, z_loss_coef: float = 1e-4, ignore_index: int = IGNORE_INDEX
) -> LossOutput:
    """Loss for logits (..., V) against integer targets (...).

    log Z is computed once and reused: cross-entropy = log Z - logit[target]. Done in at least
    float32 (bf16 logits lose too much in the log-sum-exp; float64 stays float64).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = targets != ignore_index
    safe_targets = targets.masked_fill(~valid, 0)
    nll, log_z = _NLLAndLogZ.apply(logits.reshape(-1, logits.shape[-1]), safe_targets.reshape(-1))
    weights = valid.reshape(-1).to(logits.dtype)  # (N,): 0 for ignored targets
    n_tokens = weights.sum()
    denominator = n_tokens.clamp(min=1.0)
    cross_entropy = (nll * weights).sum() / denominator
    z_loss = z_loss_coef * (log_z.square() * weights).sum() / denominator
    return LossOutput(cross_entropy + z_loss, cross_entropy, z_loss, n_tokens)


# ---------------------------------------------------------------------------------------------
# Output projection and loss in one, chunk by chunk
# ---------------------------------------------------------------------------------------------


def _softmax_nll_log_z_(
    logits: Tensor, targets: Tensor, logits_of_rows, sync_free: bool | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The softmax of a (c, V) block written over it, -log p(target) and log Z per row.

    One exp per element (torch.softmax, row by row in cache) and log Z = x_t - log p_t from two
    gathers, where log_softmax then exp took two exps, and an amax of the logits and one of the
    probabilities two more passes over the block (issue 16). A target whose probability is
    subnormal (a logit ~87 nats below log Z in float32) would lose digits that way: those rows'
    logits are made again (`logits_of_rows(row_indices)`) for an exact logsumexp. Checking for
    them is free on a CPU; on an accelerator it would stall the stream, and fake tensors (dry
    runs) have no values to check, so there (`sync_free`) log Z comes from the block's largest
    logit and probability instead (at the argmax p >= 1/V never underflows).
    """
    index = targets[:, None]
    target_logit = logits.gather(-1, index).squeeze(-1)
    if sync_free or (sync_free is None and not (type(logits) is Tensor and logits.is_cpu)):
        high = logits.amax(dim=-1)
        probs = torch.softmax(logits, dim=-1, out=logits)
        log_z = high - probs.amax(dim=-1).log()
        return probs, log_z - target_logit, log_z
    probs = torch.softmax(logits, dim=-1, out=logits)
    target_prob = probs.gather(-1, index).squeeze(-1)
    log_z = target_logit + (nll := -target_prob.log())
    rows = (target_prob < torch.finfo(probs.dtype).tiny).nonzero().squeeze(-1)
    if rows.numel():
        log_z[rows] = torch.logsumexp(logits_of_rows(rows), dim=-1)
        nll[rows] = log_z[rows] - target_logit[rows]
    return probs, nll, log_z


class _LinearLMLoss(torch.autograd.Function):
    """loss = sum_i a_i * (-log p_i[t_i] + coef * log(Z_i)^2) with logits_i = W h_i.

    The (N, V) logits are never whole: each chunk of tokens gets its logits, log-softmax and
    its gradients w.r.t. h and W while the chunk's block is hot, so forward already does the
    backward's two matmuls and backward only scales them by the incoming scalar gradient (the
    loss is a scalar, so its gradient is known up to that factor). Memory: one (chunk, V) block,
    plus grad_h (N, D) and grad_W (V, D), where the unfused path keeps logits and log-probs
    (N, V) alive from forward to backward and allocates a third for their gradient.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,  # (N, D)
        weight: Tensor,  # (V, D)
        targets: Tensor,  # (N,) valid ids (ignored ones replaced by 0: a is 0 there)
        ce_weight: Tensor,  # (N,) a_i: 1/n_tokens for counted targets, 0 for ignored
        z_loss_coef: float,
        chunk: int,
        compute_dtype: torch.dtype,
        want_grad_hidden: bool,
        want_grad_weight: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n = hidden.shape[0]
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        # Softmax and accumulations in float32 at least (float64 stays float64, for checks).
        exact = torch.promote_types(compute_dtype, torch.float32)
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if want_grad_hidden else None
        grad_w = None  # (V, D): the first chunk's product, then accumulated (no zero fill)
        nll = torch.empty(n, dtype=exact, device=hidden.device)
        log_z = torch.empty_like(nll)
        ce_weight = ce_weight.to(exact)
        # One (chunk, V) block at a time, the softmax written over it. mm fills one buffer that
        # every chunk reuses (fresh blocks were new pages, faulted in and zeroed each time: the
        # loss alone 7% slower at vocab 8192, issue 16); oneDNN, faster on CPU for blocks of up
        # to 16 MiB (palm.cpu_kernels), makes each block anew.
        rows = min(chunk, n)
        onednn = onednn_logits_serve(h, w, rows)
        buffer = None if onednn else torch.empty(rows, w.shape[0], dtype=exact, device=h.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                h_c, t = h[start:end], targets[start:end]
                logits = probs = p = None  # the last chunk's block goes before the next comes
                logits = logits_block(h_c, w, None if onednn else buffer[: end - start])  # (c, V)
                probs, nll[start:end], log_z[start:end] = _softmax_nll_log_z_(
                    logits, t, lambda rows, h_c=h_c: torch.mm(h_c[rows], w.t()).to(exact)
                )
                if not (want_grad_hidden or want_grad_weight):
                    continue
                # d loss / d logits = s * softmax - a * onehot(t), s = a + 2 coef a log Z (from
                # d nll = a, d log Z = 2 coef a log Z). The (c, V) block goes into both matmuls
                # as it is; s and a scale the (c, D) sides instead, a pass over (c, V) less.
                a = ce_weight[start:end, None]
                s_ = a * (1.0 + 2.0 * z_loss_coef * log_z[start:end, None])
                p = probs if compute_dtype == exact else probs.to(compute_dtype)
                if want_grad_hidden and compute_dtype == exact:
                    torch.mm(p, w, out=grad_h[start:end]).mul_(s_).sub_(a * w[t])
                elif want_grad_hidden:
                    grad_h[start:end] = torch.mm(p, w).to(exact).mul_(s_).sub_(a * w[t].to(exact))
                if want_grad_weight:
                    h_exact = h_c.to(exact)
                    scaled_h = (h_exact * s_).to(compute_dtype)
                    if grad_w is None:
                        grad_w = torch.mm(p.t(), scaled_h).to(exact)
                    elif compute_dtype == exact:
                        grad_w.addmm_(p.t(), scaled_h)
                    else:
                        grad_w.add_(torch.mm(p.t(), scaled_h))
                    grad_w.index_add_(0, t, h_exact * -a)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        cross_entropy = (nll * ce_weight).sum()
        z_loss = z_loss_coef * (log_z.square() * ce_weight).sum()
        ctx.mark_non_differentiable(cross_entropy, z_loss)
        return cross_entropy + z_loss, cross_entropy, z_loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_ce: Tensor, _grad_z: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else (grad_h * grad_loss).to(ctx.hidden_dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None, None, None


def _apply_eagerly(*args):
    """_LinearLMLoss.apply, never traced by torch.compile: compiled, the chunk loop would be
    unrolled (one copy of the body per chunk), and it is three matmuls and a softmax per chunk,
    nothing to fuse (issue 16: the chunk's softmax and gradient as one compiled kernel were no
    faster than the eager ops). The check keeps eager callers from importing torch._dynamo (2 s)
    through torch.compiler.disable."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(_LinearLMLoss.apply)(*args)
    return _LinearLMLoss.apply(*args)


def linear_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    z_loss_coef: float = 1e-4,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> LossOutput:
    """`lm_loss(hidden @ weight.T, targets)` without ever holding all (..., V) logits.

    hidden (..., D), weight (V, D) (the output projection), targets (...). The values and
    gradients are those of `lm_loss` on the full logits; the logits are made `chunk_tokens`
    rows at a time (default: palm.flops.chunk_tokens_for). `compute_dtype` is the matmuls'
    dtype (default: autocast's where autocast is on, else hidden's); the softmax is float32.
    """
    device_type = hidden.device.type
    if compute_dtype is None:
        compute_dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else hidden.dtype
        )
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).long()  # gather/scatter index dtype; the loader may give int32
    valid = targets != ignore_index
    n_tokens = valid.sum().to(torch.float32)
    exact = torch.promote_types(hidden.dtype, torch.float32)
    ce_weight = valid.to(exact) / n_tokens.to(exact).clamp(min=1.0)
    grad_on = torch.is_grad_enabled()
    loss, cross_entropy, z_loss = _apply_eagerly(
        hidden,
        weight,
        targets.masked_fill(~valid, 0),
        ce_weight,
        float(z_loss_coef),
        chunk_tokens or chunk_tokens_for(weight.shape[0], device_type),
        compute_dtype,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
    )
    return LossOutput(loss, cross_entropy, z_loss, n_tokens)


# ---------------------------------------------------------------------------------------------
# The same, with the vocabulary split over tensor-parallel ranks (PaLM §4)
# ---------------------------------------------------------------------------------------------


class _VocabParallelLMLoss(torch.autograd.Function):
    """_LinearLMLoss where this rank holds rows [start, start + V_r) of the output weight: each
    chunk's softmax normaliser and target logit are summed over the ranks (max, then sum), so no
    rank ever holds logits beyond its own (chunk, V_r) block. `all_reduce(t, op)` sums ("sum") or
    maximises ("max") `t` in place over the ranks sharing the vocabulary."""

    @staticmethod
    def forward(ctx, hidden, weight, start, targets, ce_weight, z_loss_coef, chunk, all_reduce):
        exact = torch.promote_types(hidden.dtype, torch.float32)
        n, rows = hidden.shape[0], weight.shape[0]
        grad_h = torch.zeros(hidden.shape, dtype=exact, device=hidden.device)
        grad_w = torch.zeros(weight.shape, dtype=exact, device=weight.device)
        nll = torch.empty(n, dtype=exact, device=hidden.device)
        log_z = torch.empty_like(nll)
        ce_weight = ce_weight.to(exact)
        h, w = hidden.to(exact), weight.to(exact)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        for begin in range(0, n, chunk):
            end = min(begin + chunk, n)
            logits = torch.mm(h[begin:end], w.t())  # (c, V_r)
            local = targets[begin:end] - start
            mine = (local >= 0) & (local < rows)  # targets in this rank's rows
            index = local.clamp(0, rows - 1)[:, None]
            target_logit = logits.gather(-1, index)[:, 0] * mine  # 0 on the other ranks
            high = logits.max(-1).values
            all_reduce(high, "max")
            logits.sub_(high[:, None]).exp_()  # exp(x - max), in place
            sums = torch.stack((logits.sum(-1), target_logit))
            all_reduce(sums, "sum")  # (sum of exp, the target's logit) over the ranks
            log_z[begin:end] = high + sums[0].log()
            nll[begin:end] = log_z[begin:end] - sums[1]
            if want_grad:
                a = ce_weight[begin:end]
                scale = a + 2.0 * z_loss_coef * a * log_z[begin:end]
                grad = logits.mul_((scale / sums[0])[:, None])  # softmax * scale: one pass
                grad.scatter_add_(-1, index, -(a * mine)[:, None])
                grad_h[begin:end] = torch.mm(grad, w)
                grad_w.addmm_(grad.t(), h[begin:end])
        if want_grad:
            all_reduce(grad_h, "sum")  # each rank's vocabulary rows add to every token's gradient
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        cross_entropy = (nll * ce_weight).sum()
        z_loss = z_loss_coef * (log_z.square() * ce_weight).sum()
        ctx.mark_non_differentiable(cross_entropy, z_loss)
        return cross_entropy + z_loss, cross_entropy, z_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_z):
        grad_h, grad_w = ctx.saved_tensors
        gh, gw = (grad_h * grad_loss).to(ctx.dtypes[0]), (grad_w * grad_loss).to(ctx.dtypes[1])
        return gh, gw, None, None, None, None, None, None


def vocab_parallel_lm_loss(
    hidden: Tensor,
    weight_shard: Tensor,
    vocab_start: int,
    targets: Tensor,
    all_reduce,
    z_loss_coef: float = 1e-4,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int | None = None,
) -> LossOutput:
    """`linear_lm_loss` with this rank's rows [vocab_start, vocab_start + V_r) of the (V, D)
    output weight (vocabulary parallelism); hidden (..., D) and targets (...) are the same on
    every rank, and so is the result. Computed in float32 at least (autocast is ignored)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).long()
    valid = targets != ignore_index
    n_tokens = valid.sum().to(torch.float32)
    exact = torch.promote_types(hidden.dtype, torch.float32)
    ce_weight = valid.to(exact) / n_tokens.to(exact).clamp(min=1.0)
    chunk = chunk_tokens or chunk_tokens_for(weight_shard.shape[0], hidden.device.type)
    with torch.autocast(hidden.device.type, enabled=False):
        loss, cross_entropy, z_loss = _VocabParallelLMLoss.apply(
            hidden,
            weight_shard,
            vocab_start,
            targets.masked_fill(~valid, 0),
            ce_weight,
            float(z_loss_coef),
            chunk,
            all_reduce,
        )
    return LossOutput(loss, cross_entropy, z_loss, n_tokens)


@torch.no_grad()
def token_scores(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token negative log-likelihood (float32) and whether each target is the argmax, for
    hidden (..., D) and the output projection weight (V, D): evaluation's scores, made
    `chunk_tokens` rows at a time, so no (..., V) logits tensor ever exists whole (16.8 GB in
    float32 at PaLM's 256k vocabulary for 8 x 2048 tokens). Ignored targets score (0, True)."""
    shape, vocab = targets.shape, weight.shape[0]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).long()
    rows = chunk_tokens or chunk_tokens_for(vocab, hidden.device.type)
    nll = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    greedy = torch.ones(targets.shape, dtype=torch.bool, device=hidden.device)
    for start in range(0, targets.numel(), rows):
        target = targets[start : start + rows]
        logits = (hidden[start : start + rows] @ weight.T).float()  # (rows, V)
        picked = logits.gather(1, target.clamp(min=0)[:, None])[:, 0]
        keep = target != ignore_index
        nll[start : start + rows] = torch.where(keep, logits.logsumexp(-1) - picked, 0.0)
        greedy[start : start + rows] = ~keep | (logits.argmax(-1) == target)
    return nll.view(shape), greedy.view(shape)
