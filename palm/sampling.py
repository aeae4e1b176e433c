"""Autoregressive sampling with the key/value cache: pure filters plus one decoding loop.

Under multi-query attention the cache is one head wide (PaLM §2), so each new token costs one
forward of a single position against the cached keys/values: cost per token stays flat.
"""

from __future__ import annotations

import torch
from torch import Tensor

from palm.model import PaLM


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (B, V); others become -inf. k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability reaches p (B, V)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # A token is dropped when the tokens before it already reach p; the top token always stays.
    drop_sorted = probs.cumsum(-1) - probs >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(
    logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token (B,) from last-position logits (B, V); temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: PaLM, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
    top_k: int = 0, top_p: float = 1.0, eod_id: int | None = None,
    generator: torch.Generator | None = None, use_cache: bool = True,
) -> Tensor:
    """Continue prompt (B, T) by up to max_new_tokens tokens; returns only the new ones (B, N).

    Rows that produced `eod_id` keep emitting it; decoding stops early once every row has.
    Without the cache every step re-runs the whole sequence (kept for tests and benchmarks).
    """
    was_training = model.training
    model.eval()
    batch, length = prompt.shape
    total = length + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({length}) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds the model's context of {model.config.max_seq_len} tokens")
    cache = model.new_cache(batch, total) if use_cache else None
    sequence, new_tokens = prompt, []
    logits = model(prompt, cache)[:, -1]
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        token = next_token(logits, temperature, top_k, top_p, generator)
        if eod_id is not None:
            token = token.masked_fill(finished, eod_id)
            finished |= token == eod_id
        new_tokens.append(token)
        if eod_id is not None and bool(finished.all()):
            break
        if use_cache:
            logits = model(token[:, None], cache)[:, -1]
        else:
            sequence = torch.cat([sequence, token[:, None]], dim=1)
            logits = model(sequence)[:, -1]
    model.train(was_training)
    return torch.stack(new_tokens, dim=1) if new_tokens else prompt[:, :0]
