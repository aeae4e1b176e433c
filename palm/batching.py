"""Completion jobs and their batched decoding with the key/value cache, for `palm serve`.

No HTTP and no threads here (palm.serve, palm.engine): a job is token ids, sampling options and
an `emit` callback that receives its events, so decoding is tested without a server.

A job decodes exactly as generate.py decodes the same prompts: its prompts x n rows are
left-padded as one block (`pad_left`), the same `prefill`/`next_tokens`/`decode_step` run, and
its rows are sampled with its own generator seeded once, so the random draws are the same.
Batching rule: jobs share a batch only when their padded prompt width is the same (and either
all or none of them carry padding), so every row holds the same tokens at the same positions
under the same mask as in the job alone. Sampling options may differ within a batch: each job
samples its own slice of the logits. What batching cannot keep is the float rounding of a
matmul at another batch size (about 1e-6 in the logits on a CPU), which changes a token only
at a near-tie; decoding each job alone (`palm serve --batching off`) is generate.py bit for bit.
A job leaves its batch (its cache rows are dropped) when it is done or cancelled.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from palm.kv_cache import KVCache, WeightCopies
from palm.model import PaLM
from palm.sampling import TextStream, decode_step, next_tokens, pad_left, prefill
from palm.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------
# Jobs and their events
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenLogprob:
    token: str  # the token's own text
    logprob: float  # log-probability under the model (raw logits: no temperature or filters)
    top: dict[str, float]  # the likeliest tokens at that position and their log-probabilities
    offset: int  # where the token's text starts in its row's text


@dataclass
class Step:
    """What one decoding step added to each row of a job: text, token, finish reason."""

    texts: list[str]  # newly printable text per row ("" when held back or done)
    logprobs: list[TokenLogprob | None]  # per row, when the job asked for logprobs
    finished: list[str | None]  # per row: "stop" or "length" when the row ended at this step


@dataclass
class PromptScores:
    """Log-probabilities of one prompt's tokens (after <eod>), for echo with logprobs."""

    prompt: int
    tokens: list[TokenLogprob]


@dataclass
class Done:
    completion_tokens: int  # tokens decoded for all rows, each up to and with its last one


@dataclass
class Failed:
    message: str


Event = Step | PromptScores | Done | Failed


@dataclass(eq=False)  # compared and hashed by identity
class Job:
    """One completion request: prompts x n rows, decoded as generate.py would decode them."""

    prompts: list[list[int]]  # token ids of each prompt, <eod> first
    max_tokens: int  # tokens to decode per row (0: only score the prompts)
    emit: Callable[[Event], None]  # called from the worker thread; must not block
    n: int = 1  # samples per prompt; rows are prompt-major: prompt 0's n samples first
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # a row ends at the first of these (the text is cut before it)
    logprobs: int | None = None  # alternatives per token to report; None = no logprobs
    score_prompts: bool = False  # also emit PromptScores (echo with logprobs)
    ignore_eod: bool = False  # decode past <eod> instead of ending the row there
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def rows(self) -> list[list[int]]:
        return [prompt for prompt in self.prompts for _ in range(self.n)]

    @property
    def batch_key(self) -> tuple[int, bool]:
        """Jobs with equal keys batch exactly: (padded width, whether any row is padded)."""
        lengths = [len(p) for p in self.prompts]
        return max(lengths), min(lengths) != max(lengths)


def send(job: Job, event: Event) -> None:
    """Hand `event` to the job's listener; a listener that fails (gone) cancels the job."""
    try:
        job.emit(event)
    except Exception:  # noqa: BLE001 - a listener that is gone (closed loop) ends its job
        job.cancelled.set()


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's own text; a special token (which decodes to nothing) by its piece name."""
    return tokenizer.decode([token_id]) or tokenizer.id_to_piece(token_id)


def _logprob_entries(tokenizer: Tokenizer, logits: Tensor, chosen: Tensor, top: int):
    """Per row of logits (B, V): (logprob of `chosen` (B,), top-`top` {text: logprob})."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    picked = logp.gather(-1, chosen[:, None].to(logp.device))[:, 0].tolist()
    best = logp.topk(top, dim=-1) if top > 0 else None
    tops = []
    for row in range(logp.shape[0]):
        if best is None:
            tops.append({})
            continue
        ids, values = best.indices[row].tolist(), best.values[row].tolist()
        tops.append({token_text(tokenizer, i): v for i, v in zip(ids, values)})
    return picked, tops


@torch.no_grad()
def score_prompt(model: PaLM, tokenizer: Tokenizer, ids: list[int], top: int) -> list[TokenLogprob]:
    """Log-probability of every token of `ids` after the first (<eod>), given those before."""
    device = next(model.parameters()).device
    hidden = model.features(torch.tensor([ids], device=device))[0, :-1]  # (T - 1, D)
    targets = torch.tensor(ids[1:], device=device)
    entries: list[TokenLogprob] = []
    chunk = max(1, 2**24 // model.config.vocab_size)  # positions per (chunk, V) logits block
    for start in range(0, len(targets), chunk):
        logits = F.linear(hidden[start : start + chunk], model.output_weight)
        picked, tops = _logprob_entries(tokenizer, logits, targets[start : start + chunk], top)
        for i, (logprob, best) in enumerate(zip(picked, tops)):
            token_id = ids[1 + start + i]
            offset = len(tokenizer.decode(ids[1 : 1 + start + i]))
            entries.append(TokenLogprob(token_text(tokenizer, token_id), logprob, best, offset))
    return entries


class _Running:
    """A job inside a batch: its generator, finished rows and text streams."""

    def __init__(self, job: Job, tokenizer: Tokenizer, device: torch.device) -> None:
        self.job, self.tokenizer = job, tokenizer
        self.size = len(job.rows)
        self.generator = torch.Generator(device).manual_seed(job.seed)
        self.finished = torch.zeros(self.size, dtype=torch.bool, device=device)
        self.streams = [TextStream(tokenizer, job.stop) for _ in range(self.size)]
        self.steps = 0  # tokens decoded per row so far
        self.produced = 0  # tokens counted in the usage: each row's up to its last

    def sample(self, logits: Tensor) -> Tensor:
        """Sample this job's rows from its logits (size, V), as generate.py's loop does."""
        job, eod = self.job, self.tokenizer.eod_id
        token = next_tokens(
            logits,
            self.finished,
            None if job.ignore_eod else eod,
            job.temperature,
            job.top_k,
            job.top_p,
            self.generator,
        )
        self.steps += 1
        scores = None
        if job.logprobs is not None:
            scores = _logprob_entries(self.tokenizer, logits, token, job.logprobs)
        texts, entries, finished = [""] * self.size, [None] * self.size, [None] * self.size
        for row, stream in enumerate(self.streams):
            if stream.done:
                continue
            self.produced += 1
            token_id = int(token[row])
            if not job.ignore_eod and token_id == eod:
                stream.done, finished[row] = True, "stop"
                texts[row] = stream.flush()
                continue
            if scores is not None:
                text = token_text(self.tokenizer, token_id)
                entries[row] = TokenLogprob(text, scores[0][row], scores[1][row], len(stream.text))
            texts[row] = stream.push(token_id)
            if stream.done:  # a stop string: push() already cut and flushed the text
                finished[row] = "stop"
        if self.steps == job.max_tokens:
            for row, stream in enumerate(self.streams):
                if not stream.done:
                    texts[row] += stream.flush()
                    stream.done, finished[row] = True, "length"
        send(job, Step(texts, entries, finished))
        return token

    @property
    def done(self) -> bool:
        return all(stream.done for stream in self.streams)


def _keep_rows(cache: KVCache, rows: Tensor) -> None:
    """Drop the cache rows not in `rows` (indices), in place."""
    cache.keys = [k.index_select(0, rows) for k in cache.keys]
    cache.values = [v.index_select(0, rows) for v in cache.values]
    if cache.key_mask is not None:
        cache.key_mask = cache.key_mask.index_select(0, rows)


class Batch:
    """Jobs of one batch key decoding together: one forward per step for all their rows."""

    def __init__(
        self,
        model: PaLM,
        tokenizer: Tokenizer,
        jobs: list[Job],
        transposed: WeightCopies | bool | None = None,
    ) -> None:
        self.model, self.device = model, next(model.parameters()).device
        self.running = [_Running(job, tokenizer, self.device) for job in jobs]
        rows = [row for job in jobs for row in job.rows]
        tokens, mask = pad_left(rows, pad_id=max(tokenizer.pad_id, 0))
        length = tokens.shape[1] + max(job.max_tokens for job in jobs)
        with torch.inference_mode():  # as palm.sampling.stream: the cache lives only here
            # The engine's shared weight copies, or False for none; None: as new_cache decides.
            self.cache, self.logits = prefill(
                model, tokens.to(self.device), mask.to(self.device), length, transposed
            )

    @property
    def jobs(self) -> list[Job]:
        return [r.job for r in self.running]

    @torch.inference_mode()
    def step(self) -> tuple[list[Job], list[Job]]:
        """Decode one token for every row; returns the jobs that ended (done, cancelled)."""
        keep, done, cancelled, start = [], [], [], 0  # keep: (running, its rows, its tokens)
        for running in self.running:
            rows = slice(start, start + running.size)
            start += running.size
            if running.job.cancelled.is_set():
                cancelled.append(running)
                continue
            token = running.sample(self.logits[rows])  # (size,)
            if running.done:
                send(running.job, Done(running.produced))
                done.append(running)
            else:
                keep.append((running, rows, token))
        if len(keep) < len(self.running):  # some jobs left: drop their rows from the cache
            index = [i for _, rows, _ in keep for i in range(rows.start, rows.stop)]
            if index:
                _keep_rows(self.cache, torch.tensor(index, device=self.device))
        self.running = [running for running, _, _ in keep]
        if self.running:
            token = torch.cat([t for _, _, t in keep])  # (rows left,)
            self.logits = decode_step(self.model, token, self.cache)  # (rows left, V)
        return [r.job for r in done], [r.job for r in cancelled]
