"""Memorization (PaLM §7, after Carlini et al. 2022): how much training data comes back verbatim.

Sample 100-token spans of the training stream, prompt the model with the first 50 tokens,
decode 50 greedily, and count a span as memorized when all 50 equal the original. The same on a
held-out split is the baseline: it is above 0 only through boilerplate that repeats across
splits (licences, headers), so train minus held-out is what the model memorized. PaLM reports
1.6% (8B) and 2.4% (540B) on training spans.

Spans are drawn uniformly from the packed token stream (as training examples are cut from it,
§5), seeded, without replacement; spans containing padding are redrawn.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from palm.data.loader import open_split
from palm.errors import ConfigError, DataError
from palm.kv_cache import weight_copies
from palm.model import PaLM
from palm.sampling import generate


@dataclass
class MemorizationResult:
    split: str
    n_spans: int
    prompt_tokens: int
    continuation_tokens: int
    exact_matches: int  # spans whose whole greedy continuation equals the original
    token_matches: int  # continuation tokens equal to the original at the same position
    starts: list[int] = field(default_factory=list)  # stream offsets of the sampled spans
    matched: list[bool] = field(default_factory=list)  # per span: exact match

    @property
    def exact_match_rate(self) -> float:
        return self.exact_matches / max(self.n_spans, 1)

    @property
    def token_match_rate(self) -> float:
        return self.token_matches / max(self.n_spans * self.continuation_tokens, 1)

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson 95% interval of the exact-match rate: rates of ~2% need it at ~1000 spans."""
        n, p = self.n_spans, self.exact_match_rate
        if n == 0:
            return 0.0, 1.0
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def to_dict(self, with_spans: bool = False) -> dict:
        out = asdict(self)
        if not with_spans:
            out.pop("starts"), out.pop("matched")
        low, high = self.interval()
        return {
            **out,
            "exact_match_rate": self.exact_match_rate,
            "token_match_rate": self.token_match_rate,
            "exact_match_ci95": [low, high],
        }


def sample_span_starts(
    tokens: np.ndarray,
    n_spans: int,
    span: int,
    seed: int,
    pad_id: int | None = None,
    eod_id: int | None = None,
) -> np.ndarray:
    """Up to n_spans distinct start offsets of `span`-token windows of `tokens`, none padded."""
    n_starts = len(tokens) - span + 1
    if n_starts < 1:
        raise DataError(f"a split of {len(tokens)} tokens has no {span}-token span")
    rng = np.random.default_rng(seed)
    if n_starts <= 4 * n_spans:
        candidates = rng.permutation(n_starts)  # small split: shuffle every start
    else:
        # Oversample then deduplicate; far cheaper than a permutation of a 100M-token stream.
        candidates = np.unique(rng.integers(0, n_starts, size=2 * n_spans + 16))
        candidates = rng.permutation(candidates)
    # Spans lie within one document, as Carlini et al. sample within examples: no padding and
    # no end-of-document inside (one may open the span: the document's own start).
    offsets = np.arange(span)
    for excluded, first in ((pad_id, 0), (eod_id, 1)):
        if excluded is not None and excluded >= 0:
            window = tokens[candidates[:, None] + offsets[first:]]
            candidates = candidates[~(window == excluded).any(axis=1)]
    return np.sort(candidates[:n_spans]).astype(np.int64)


@torch.no_grad()
def memorization(
    model: PaLM,
    tokens: np.ndarray,
    split: str = "train",
    n_spans: int = 1000,
    prompt_tokens: int = 50,
    continuation_tokens: int = 50,
    batch_size: int = 32,
    seed: int = 0,
    pad_id: int | None = None,
    progress: bool = False,
    eod_id: int | None = None,
) -> MemorizationResult:
    """Exact-match rate of greedy continuations of spans of `tokens` (one split's stream)."""
    span = prompt_tokens + continuation_tokens
    if span > model.config.max_seq_len:
        raise ConfigError(
            f"prompt_tokens + continuation_tokens = {span} exceeds the model's "
            f"context of {model.config.max_seq_len}"
        )
    starts = sample_span_starts(tokens, n_spans, span, seed, pad_id, eod_id)
    device = next(model.parameters()).device
    result = MemorizationResult(
        split, len(starts), prompt_tokens, continuation_tokens, 0, 0, starts.tolist(), []
    )
    from tqdm import tqdm

    bar = tqdm(
        total=len(starts),
        unit="span",
        desc=f"memorization {split}",
        disable=not progress,
        leave=False,
    )
    offsets = np.arange(span)
    # Decoding's weight copies, once for every batch (of up to batch_size rows: their kind).
    transposed = weight_copies(model, batch_size=min(batch_size, len(starts)))
    for first in range(0, len(starts), batch_size):
        rows = torch.from_numpy(
            tokens[starts[first : first + batch_size, None] + offsets].astype(np.int64)
        ).to(device)  # (B, span)
        prompt, truth = rows[:, :prompt_tokens], rows[:, prompt_tokens:]
        # Greedy and no early stop at <eod>: a span may cross a document boundary.
        out = generate(
            model, prompt, continuation_tokens, temperature=0.0, transposed_weights=transposed
        )  # (B, C)
        same = out == truth
        exact = same.all(dim=1)
        result.exact_matches += int(exact.sum())
        result.token_matches += int(same.sum())
        result.matched.extend(bool(x) for x in exact)
        bar.update(len(rows))
    bar.close()
    return result


def split_tokens(dataset_dir: str | Path, split: str) -> tuple[np.ndarray, int | None, int]:
    """The token stream of a prepared split (memory-mapped), its padding id (if padded) and its
    end-of-document id."""
    tokens, manifest = open_split(dataset_dir, split, need_tokens=True)
    return tokens, manifest.pad_id if manifest.layout == "padded" else None, manifest.eod_id
