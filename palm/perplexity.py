"""Perplexity the way papers report it: token-level, bits per byte, and WikiText word-level.

Every document is scored on its own, conditioned on <eod> (a document start, as in the packed
training data, PaLM §5), and each of its tokens is predicted exactly once. A document longer
than the context is scored with a sliding window: windows start every `stride` tokens, and
each window scores only the targets no earlier window reached, so every token sees at least
context - stride tokens of history (all of it when the document fits). stride = context gives
disjoint windows; smaller strides cost more and give lower, fairer perplexity.

What is reported (nll = total negative log-likelihood in nats over the scored tokens):
- token perplexity exp(nll / n_tokens): depends on the tokenizer, so only same-tokenizer
  comparisons are fair;
- bits per byte nll / (ln 2 * n_bytes of the UTF-8 text): tokenizer-independent;
- word perplexity exp(nll / n_words), n_words counted as WikiText does (whitespace words plus
  one <eos> per line): the only form comparable with the WikiText literature (Transformer-XL
  24.0 on WikiText-103 test; GPT-2 small zero-shot 37.5).
The <eod> after a document is not scored: it is not part of the text the word and byte counts
describe, and lm-evaluation-harness' rolling loglikelihood does not score it either.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from palm.data.corpus import count_words, iter_documents
from palm.data.loader import open_split
from palm.errors import ConfigError, DataError
from palm.loss import IGNORE_INDEX, perplexity_of, token_scores
from palm.model import PaLM
from palm.tokenizer import Tokenizer


@dataclass
class PerplexityResult:
    nll: float  # total negative log-likelihood, nats
    n_tokens: int  # tokens scored (document tokens, <eod> excluded)
    n_documents: int
    n_bytes: int  # UTF-8 bytes of the scored text
    n_words: int  # WikiText-convention words of the scored text
    context: int  # window length, tokens
    stride: int  # window step, tokens
    source: str = ""  # what was scored (split or file)

    @property
    def token_perplexity(self) -> float:
        return perplexity_of(self.nll / max(self.n_tokens, 1))

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * max(self.n_bytes, 1))

    @property
    def word_perplexity(self) -> float:
        return perplexity_of(self.nll / max(self.n_words, 1))

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "loss": self.nll / max(self.n_tokens, 1),
            "token_perplexity": self.token_perplexity,
            "bits_per_byte": self.bits_per_byte,
            "word_perplexity": self.word_perplexity,
        }


def windows(n_targets: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Sliding windows over a sequence s_0 .. s_n (s_0 = <eod>, n = n_targets).

    Yields (begin, end, n_scored): the window's inputs are s[begin:end] (at most `context`
    tokens) predicting s[begin+1 : end+1], and its last n_scored predictions are new. Target j
    is scored by the first window (begin a multiple of stride) with begin + context >= j.
    """
    if not 1 <= stride <= context:
        raise ConfigError(f"stride must be in [1, context={context}], got {stride}")
    begin, done = 0, 0  # `done`: targets s_1 .. s_done already scored
    while done < n_targets:
        end = min(begin + context, n_targets)
        yield begin, end, end - done
        done, begin = end, begin + stride


@torch.no_grad()
def score_documents(
    model: PaLM,
    documents: Sequence[Sequence[int]],
    prefix_id: int,
    context: int,
    stride: int,
    batch_size: int = 8,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """Per document (nll in nats, tokens scored): each conditioned on `prefix_id` (<eod>)."""
    if context > model.config.max_seq_len:
        raise ConfigError(
            f"context {context} exceeds the model's max_seq_len "
            f"{model.config.max_seq_len}; use --context <= that"
        )
    device = next(model.parameters()).device
    # Every window of every document, as (document, inputs+1 target tokens, scored count).
    items: list[tuple[int, np.ndarray, int]] = []
    for index, doc in enumerate(documents):
        seq = np.concatenate([[prefix_id], np.asarray(doc, dtype=np.int64)])
        for begin, end, n_scored in windows(len(seq) - 1, context, stride):
            items.append((index, seq[begin : end + 1], n_scored))
    # Longest first so that batches hold windows of similar length (less padding).
    order = sorted(range(len(items)), key=lambda i: -len(items[i][1]))
    totals = [[0.0, 0] for _ in documents]
    from tqdm import tqdm  # a core dependency; imported here to keep the module import light

    was_training = model.training
    model.eval()
    bar = tqdm(total=len(items), unit="window", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start : start + batch_size]]
        width = max(len(tokens) for _, tokens, _ in chunk) - 1
        inputs = torch.zeros(len(chunk), width, dtype=torch.long)
        targets = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for row, (_, tokens, n_scored) in enumerate(chunk):
            t = torch.from_numpy(tokens)
            n = len(tokens) - 1
            # Right padding: causal attention means it never changes the real positions.
            inputs[row, :n] = t[:-1]
            targets[row, n - n_scored : n] = t[n - n_scored + 1 :]
        # Scored through the chunked output projection: never the whole (B, T, V) logits.
        hidden = model.features(inputs.to(device))  # (B, T, D)
        nll, _ = token_scores(hidden, model.output_weight, targets.to(device))  # (B, T)
        for row, (index, _, n_scored) in enumerate(chunk):
            totals[index][0] += float(nll[row].sum())
            totals[index][1] += n_scored
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return [(nll, n) for nll, n in totals]


def split_documents(tokens: np.ndarray, eod_id: int, pad_id: int | None = None) -> list[np.ndarray]:
    """Cut a packed token stream at <eod> into documents (without it); padding is dropped."""
    tokens = np.asarray(tokens)
    if pad_id is not None and pad_id >= 0:
        tokens = tokens[tokens != pad_id]
    cuts = np.flatnonzero(tokens == eod_id)
    docs, start = [], 0
    for cut in cuts:
        if cut > start:
            docs.append(tokens[start:cut].astype(np.int64))
        start = cut + 1
    if start < len(tokens):  # a last document without its <eod>
        docs.append(tokens[start:].astype(np.int64))
    return docs


def text_counts(tokenizer: Tokenizer, documents: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(bytes, words) of the text of token documents; exact because the tokenizer is lossless
    (PaLM §2), so decoding gives back the original text."""
    texts = [tokenizer.decode(doc) for doc in documents]
    return sum(len(t.encode("utf-8")) for t in texts), sum(count_words(t) for t in texts)


def split_source(
    dataset_dir: str | Path,
    split: str,
    tokenizer: Tokenizer,
    max_documents: int = 0,
) -> tuple[list[np.ndarray], int, int]:
    """Documents of a prepared split with their byte and word counts (the manifest's, or
    recounted from the decoded text when only the first max_documents are used)."""
    mapped, manifest = open_split(dataset_dir, split, need_tokens=True)
    meta = Path(dataset_dir) / "meta.json"
    if manifest.tokenizer_sha256 and manifest.tokenizer_sha256 != tokenizer.sha256:
        raise DataError(
            f"{meta}: this data was encoded with another tokenizer than the "
            f"model's; pass that data's tokenizer (--tokenizer) or re-encode it"
        )
    tokens = np.array(mapped)  # read once: the documents are cut from it
    info = manifest.splits[split]
    pad = manifest.pad_id if manifest.layout == "padded" else None
    docs = split_documents(tokens, manifest.eod_id, pad)
    if max_documents and max_documents < len(docs):
        docs = docs[:max_documents]
        n_bytes, n_words = text_counts(tokenizer, docs)
    elif "n_bytes" in info and "n_words" in info:
        n_bytes, n_words = int(info["n_bytes"]), int(info["n_words"])
    else:  # an older manifest without the counts
        n_bytes, n_words = text_counts(tokenizer, docs)
    return docs, n_bytes, n_words


def text_source(
    path: str | Path,
    tokenizer: Tokenizer,
    documents: str = "file",
    max_documents: int = 0,
) -> tuple[list[np.ndarray], int, int]:
    """Documents of a text file (cut as download.py would), with byte and word counts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such text file; pass a UTF-8 .txt (or .jsonl) file")
    texts = list(iter_documents(path, documents))
    if max_documents:
        texts = texts[:max_documents]
    if not texts:
        raise DataError(f"{path}: no text to score")
    docs = [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts)]
    return (docs, sum(len(t.encode("utf-8")) for t in texts), sum(count_words(t) for t in texts))


def perplexity(
    model: PaLM,
    documents: Sequence[Sequence[int]],
    n_bytes: int,
    n_words: int,
    prefix_id: int,
    context: int,
    stride: int,
    batch_size: int = 8,
    progress: bool = False,
    source: str = "",
) -> PerplexityResult:
    if max((int(np.max(d)) for d in documents if len(d)), default=0) >= model.config.vocab_size:
        raise DataError(
            f"{source}: token ids beyond the model's vocabulary of "
            f"{model.config.vocab_size}; the data and the model use different "
            f"tokenizers"
        )
    scores = score_documents(model, documents, prefix_id, context, stride, batch_size, progress)
    return PerplexityResult(
        sum(s[0] for s in scores),
        sum(s[1] for s in scores),
        len(documents),
        n_bytes,
        n_words,
        context,
        stride,
        source,
    )


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, windows, n_windows: int, batch_size: int, world, device
) -> float:
    """Mean cross-entropy of the first `n_windows` validation windows (the same every time,
    whatever the number of ranks, shared out among them), as the training loop reports it.

    `model(x, targets=y, z_loss_coef=0)` must give a LossOutput (palm.model.PaLM, or DDP/FSDP
    around it); `world` is the run's palm.distributed.Distributed.
    """
    n = min(n_windows, len(windows))
    mine = np.arange(world.dp_rank, n, world.dp_size)  # each replica scores a share
    total, count = 0.0, 0
    for start in range(0, max(len(mine), 1), batch_size):
        chunk = mine[start : start + batch_size]
        if len(chunk) == 0:  # FSDP: every rank must run the same number of forwards
            chunk = np.arange(1)
        x, y = windows.batch(chunk)
        out = model(x.to(device), targets=y.to(device), z_loss_coef=0.0)
        if start < len(mine):
            total += float(out.cross_entropy) * float(out.n_tokens)
            count += int(out.n_tokens)
    total, count = world.all_reduce_sum([total, count], device)
    return total / max(count, 1)
