"""Autoregressive sampling with the key/value cache: pure filters, one decoding loop, and the
streaming of its tokens as text.

Under multi-query attention the cache is one head wide (PaLM §2), so each new token costs one
forward of a single position against the cached keys/values: cost per token stays flat.

Prompts of different lengths are left-padded into one batch; the cache's `key_mask` hides the
padding keys. RoPE only sees relative positions, so a padded row decodes exactly as it would
alone (up to float rounding of the batched matmuls).

`compile=True` runs each one-token step through torch.compile (palm.compiled_decoding); a
`CompiledDecoder` passed as `decoder` keeps its caches and compiled steps across requests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from palm.compiled_decoding import CompiledDecoder
from palm.config import TrainConfig
from palm.errors import ConfigError
from palm.kv_cache import KVCache, WeightCopies
from palm.model import PaLM
from palm.tokenizer import Tokenizer


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Reject sampling options that would silently mean something else."""
    if not temperature >= 0:  # also catches NaN
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0 = no top-k filter), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p}")


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
    logits: Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token (B,) from last-position logits (B, V); temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Token lists of different lengths -> (tokens (B, T), mask (B, T)); mask False = padding."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token (start it with <eod>)")
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = True
    return tokens, mask


def _masked_cache(
    model: PaLM,
    mask: Tensor | None,
    max_len: int,
    transposed_weights: bool | WeightCopies | None = None,
):
    """A cache of max_len whose key mask is the prompt mask, then True for new tokens."""
    rows = mask.shape[0] if mask is not None else 1
    cache = model.new_cache(rows, max_len, transposed_weights=transposed_weights)
    if mask is not None:
        key_mask = torch.ones(mask.shape[0], max_len, dtype=torch.bool, device=mask.device)
        key_mask[:, : mask.shape[1]] = mask
        cache.key_mask = key_mask
    return cache


def next_tokens(
    logits: Tensor,
    finished: Tensor,
    eod_id: int | None,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One decoding step's tokens (B,): rows already `finished` (B,) repeat `eod_id`, and rows
    that produce it join them (`finished` is updated in place). Without eod_id, plain sampling."""
    token = next_token(logits, temperature, top_k, top_p, generator)
    if eod_id is not None:
        token = token.masked_fill(finished, eod_id)
        finished |= token == eod_id
    return token


def prefill(
    model: PaLM,
    prompt: Tensor,
    prompt_mask: Tensor | None,
    max_len: int,
    transposed_weights: bool | WeightCopies | None = None,
    cache: KVCache | None = None,
) -> tuple[KVCache, Tensor]:
    """A cache of `max_len` positions holding prompt (B, T), and its last logits (B, V).

    `prompt_mask` (B, T) is False at left padding; without any padding the plain causal path
    is used (exact, and faster). `transposed_weights` as in `PaLM.new_cache`. `cache`: an
    empty one to fill (`KVCache.restart`, with this prompt's mask) instead of a new one.
    """
    if prompt_mask is not None:
        prompt_mask = prompt_mask.to(prompt.device)
        if bool(prompt_mask.all()):
            prompt_mask = None
    if cache is None:
        cache = (
            _masked_cache(model, prompt_mask, max_len, transposed_weights)
            if prompt_mask is not None
            else model.new_cache(prompt.shape[0], max_len, transposed_weights=transposed_weights)
        )
    return cache, _full_forward(model, prompt, prompt_mask, cache)


def decode_step(model: PaLM, token: Tensor, cache: KVCache) -> Tensor:
    """Append one token per row (B,) to the cache; the next logits (B, V)."""
    return model(token[:, None], cache)[:, -1]


def stream(
    model: PaLM,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eod_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    prompt_mask: Tensor | None = None,
    compile: bool = False,
    cache_len: int | None = None,
    transposed_weights: bool | None = None,
    decoder: CompiledDecoder | None = None,
) -> Iterator[Tensor]:
    """Yield the next token (B,) of each row of prompt (B, T), step by step.

    `prompt_mask` (B, T), False at left padding, allows prompts of different lengths. Rows that
    produced `eod_id` keep emitting it; the stream ends once every row has, or after
    max_new_tokens; the caller may stop early (stop strings) by leaving the loop. Without the
    cache every step re-runs the whole sequence (tests, benchmarks). `compile`: the compiled
    static-shape step (`CompiledStep`; CUDA graphs on CUDA); `cache_len` (>= prompt +
    max_new_tokens, the default) fixes the cache's length, so requests of other lengths reuse
    one compiled graph. `transposed_weights` as in `PaLM.new_cache`; the output is the same.
    `decoder` (with compile=True): a `CompiledDecoder` whose long-lived caches and steps serve
    this request, for sessions of many (on CUDA its graphs are recorded once per shape).
    """
    check_sampling(temperature, top_k, top_p)
    batch, length = prompt.shape
    total = length + max_new_tokens
    if compile and not use_cache:
        raise ConfigError("compile=True decodes with the cache; it needs use_cache=True")
    if decoder is not None and not (compile and decoder.model is model):
        raise ConfigError("a decoder decodes its own model, compiled: pass compile=True")
    if decoder is not None and not (
        transposed_weights is None or transposed_weights is decoder.transposed
    ):
        raise ConfigError("the decoder's caches hold its own weight copies: give "
                          "transposed_weights to CompiledDecoder, not here")  # fmt: skip
    if cache_len is not None and not total <= cache_len <= model.config.max_seq_len:
        raise ConfigError(
            f"cache_len {cache_len} must hold prompt + max_new_tokens ({total}) and fit the "
            f"model's context of {model.config.max_seq_len}"
        )
    if total > model.config.max_seq_len:
        raise ConfigError(
            f"prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
            f"exceeds the model's context of {model.config.max_seq_len} tokens; "
            f"shorten the prompt or lower max_new_tokens"
        )
    if prompt_mask is not None:
        prompt_mask = prompt_mask.to(prompt.device)
        if bool(prompt_mask.all()):
            prompt_mask = None  # no padding: the plain causal path is exact and faster
    mode = torch.inference_mode() if inference_mode_serves(model, compile) else torch.no_grad()
    loop = mode(_decode)(model, prompt, max_new_tokens, temperature, top_k, top_p, eod_id,
                         generator, use_cache, prompt_mask, compile, cache_len,
                         transposed_weights, decoder)  # fmt: skip
    with contextlib.closing(loop):
        for token in loop:
            # A plain tensor: an inference-mode one could not be saved for a later backward
            # (the caller may train on what it sampled).
            yield token.clone() if token.is_inference() else token


def inference_mode_serves(model: PaLM, compile: bool) -> bool:
    """Whether `stream` runs its loop in inference mode (no version counters or view records on
    the cache's writes and views: 1.05-1.12x the tokens/s of no_grad at batch 1-8 on CPU,
    benchmarks/RESULTS.md, "Issue 16: eager decoding in inference mode"): eager steps of plain
    parameters. Compiled steps (`compile`, or a model compiled in place by train.compile) and
    sharded ones (DTensor: FSDP2, tensor parallelism) keep no_grad: torch has had inference-mode
    bugs there, and the end-of-training sample takes those paths untested."""
    compiled = compile or getattr(model, "_compiled_call_impl", None) is not None
    return not compiled and all(type(p.data) is torch.Tensor for p in model.parameters())


def _decode(model: PaLM, prompt: Tensor, max_new_tokens: int, temperature: float, top_k: int,
            top_p: float, eod_id: int | None, generator: torch.Generator | None,
            use_cache: bool, prompt_mask: Tensor | None, compile: bool, cache_len: int | None,
            transposed_weights: bool | WeightCopies | None,
            decoder: CompiledDecoder | None) -> Iterator[Tensor]:  # fmt: skip
    """`stream`'s loop, its arguments checked (as `stream`'s, in order)."""
    batch, length = prompt.shape
    total = length + max_new_tokens
    was_training = model.training
    model.eval()
    try:
        sequence, cache, step_fn = prompt, None, None
        if use_cache:
            max_len = cache_len or total
            if compile:
                decoder = decoder or CompiledDecoder(model, transposed_weights, batch)
                step_fn = decoder.step_for(batch, max_len, prompt_mask)
            given = step_fn.cache if step_fn is not None else None
            cache, logits = prefill(model, prompt, prompt_mask, max_len, transposed_weights, given)
        else:
            logits = _full_forward(model, sequence, prompt_mask, None)
        finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
        for step in range(max_new_tokens):
            token = next_tokens(logits, finished, eod_id, temperature, top_k, top_p, generator)
            yield token
            if step == max_new_tokens - 1 or (eod_id is not None and bool(finished.all())):
                return
            if step_fn is not None:
                logits = step_fn(token)
            elif use_cache:
                logits = decode_step(model, token, cache)
            else:
                sequence = torch.cat([sequence, token[:, None]], dim=1)
                logits = _full_forward(model, sequence, prompt_mask, None)
    finally:
        model.train(was_training)


def _full_forward(model: PaLM, sequence: Tensor, prompt_mask: Tensor | None, cache) -> Tensor:
    """Last-position logits (B, V) of a whole sequence, hiding prompt padding if any."""
    if cache is None and prompt_mask is not None:
        # Recomputation with padding still needs the key mask; a throwaway cache carries it.
        cache = _masked_cache(model, prompt_mask, sequence.shape[1], transposed_weights=False)
    # Only the last position's logits: (B, V), not (B, T, V), at any vocabulary size.
    return model.decoding_logits(model.features(sequence, cache)[:, -1], cache)


@torch.no_grad()
def generate(
    model: PaLM,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eod_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    prompt_mask: Tensor | None = None,
    compile: bool = False,
    cache_len: int | None = None,
    transposed_weights: bool | None = None,
    decoder: CompiledDecoder | None = None,
) -> Tensor:
    """Continue prompt (B, T) by up to max_new_tokens tokens; returns only the new ones (B, N).

    Rows that produced `eod_id` keep emitting it; decoding stops early once every row has.
    `compile`, `cache_len`, `transposed_weights` and `decoder` as in `stream`.
    """
    tokens = list(
        stream(
            model,
            prompt,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eod_id=eod_id,
            generator=generator,
            use_cache=use_cache,
            prompt_mask=prompt_mask,
            compile=compile,
            cache_len=cache_len,
            transposed_weights=transposed_weights,
            decoder=decoder,
        )
    )
    return torch.stack(tokens, dim=1) if tokens else prompt[:, :0]


class TextStream:
    """Turns one row's token ids into printable text, cut at the first stop string.

    Text is re-decoded from all ids each step (SentencePiece pieces can merge bytes), and text
    that could still become a stop string, or a half-decoded UTF-8 character, is held back.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]) -> None:
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters already handed out
        self.done = False
        self.text = ""

    def push(self, token: int) -> str:
        """Add a token; return the newly printable text."""
        if self.done:
            return ""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.done = self.text[: min(hits)], True
            return self.flush()
        safe = len(self.text) - max((len(s) - 1 for s in self.stops), default=0)
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":
            safe -= 1  # an incomplete UTF-8 sequence: wait for its remaining bytes
        out = self.text[self.emitted : max(safe, self.emitted)]
        self.emitted += len(out)
        return out

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out


def sample_text(
    model: PaLM,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
) -> str:
    """`prompt` continued by up to `max_new_tokens` sampled tokens, read as the start of a
    document (after <eod>, like the packed training data), and cut to the model's context."""
    device = next(model.parameters()).device
    ids = [tokenizer.eod_id] + tokenizer.encode(prompt)
    room = model.config.max_seq_len - len(ids)
    new = generate(
        model,
        torch.tensor([ids], device=device),
        min(max_new_tokens, room),
        temperature=temperature,
        top_k=top_k,
        eod_id=tokenizer.eod_id,
        generator=torch.Generator(device).manual_seed(seed),
    )
    return prompt + tokenizer.decode(new[0].tolist())


def sample_run(model: PaLM, tokenizer_path: Path, train: TrainConfig) -> str | None:
    """The sample a training run ends with (train.sample_*), or None without a tokenizer."""
    if not tokenizer_path.is_file():
        return None
    return sample_text(
        model, Tokenizer.load(tokenizer_path), train.sample_prompt, train.sample_tokens,
        temperature=train.sample_temperature, top_k=train.sample_top_k, seed=train.seed,
    )  # fmt: skip
