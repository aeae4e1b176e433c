"""Packing token ids into training-ready flat files (PaLM §5, "sequences").

Two layouts, recorded in the manifest as `layout`:

combined (--combine True, PaLM's): documents are concatenated into one stream with an <eod>
    after each, and training windows are cut from the stream regardless of document boundaries
    (no padding; an example may span two sequences). Any seq_len can be read from the file.

    d1 d1 d1 <eod> d2 d2 d2 d2 d2 <eod> d3 ...

padded (--combine False): every document starts a new row of seq_len + 1 tokens; a document
    longer than a row continues in the next row, which repeats the row's last token so every
    token after the first is still a target exactly once; the rest of the last row is <pad>,
    which the loader turns into the ignore index (-100). The file is rows of seq_len + 1, so
    it is tied to the seq_len it was packed with.

    row 0: d1 d1 d1 d1 d1    row 1: d1 d1 <eod> <pad> <pad>    row 2: d2 d2 <eod> <pad> <pad>
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from palm.data.corpus import count_words
from palm.errors import DataError
from palm.files import publish, temporary_path
from palm.tokenizer import Tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the disk and page cache), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def combine_documents(documents: Sequence[Sequence[int]], eod_id: int) -> np.ndarray:
    """One stream: each document followed by <eod>."""
    out: list[int] = []
    for ids in documents:
        out.extend(ids)
        out.append(eod_id)
    return np.asarray(out, dtype=np.int64)


def pad_document(ids: Sequence[int], eod_id: int, pad_id: int, seq_len: int) -> np.ndarray:
    """Rows of seq_len + 1 for one document (+ <eod>), shape (n_rows, seq_len + 1).

    Row r holds tokens [r*seq_len, r*seq_len + seq_len + 1): consecutive rows share one token,
    as windows of the combined stream do, so each token after the first is predicted once.
    """
    tokens = np.asarray([*ids, eod_id], dtype=np.int64)
    n_rows = max(1, -(-(len(tokens) - 1) // seq_len))  # ceil((n - 1) / seq_len)
    rows = np.full((n_rows, seq_len + 1), pad_id, dtype=np.int64)
    for r in range(n_rows):
        chunk = tokens[r * seq_len : r * seq_len + seq_len + 1]
        rows[r, : len(chunk)] = chunk
    return rows


@dataclass(frozen=True)
class PackConfig:
    combine: bool  # --combine: one stream (True) or a padded row per document start (False)
    seq_len: int  # tokens per training window (rows are seq_len + 1 in the padded layout)
    n_threads: int  # SentencePiece encoding threads (--n_workers)
    batch_bytes: int = 4 << 20  # text handed to SentencePiece per call: bounds memory

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.n_threads < 1:
            raise DataError(
                f"seq_len and n_workers must be >= 1 (got {self.seq_len}, {self.n_threads})"
            )


@dataclass
class SplitStats:
    path: str  # file name inside the dataset folder
    n_tokens: int = 0  # tokens in the file (pads and <eod> included)
    n_documents: int = 0
    n_words: int = 0  # whitespace words + one per line: WikiText's count for word perplexity
    n_bytes: int = 0  # UTF-8 bytes of the source text
    sha256: str = ""


class SplitWriter:
    """Appends token arrays to `<name>.bin` through a temporary file, hashing as it goes."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype) -> None:
        self.final = folder / f"{split}.bin"
        self.temporary = temporary_path(self.final)
        self.dtype = dtype
        self.stats = SplitStats(self.final.name)
        self._hash = hashlib.sha256()
        self._handle = open(self.temporary, "wb")  # noqa: SIM115  (closed by finish/abort)

    def write(self, tokens: np.ndarray, text: str) -> None:
        data = tokens.astype(self.dtype, copy=False).tobytes()
        try:
            self._handle.write(data)
        except OSError as error:
            self.abort()
            raise DataError(
                f"{self.final}: write failed ({error.strerror}); free disk space "
                "or choose another --path"
            ) from None
        self._hash.update(data)
        self.stats.n_tokens += tokens.size
        self.stats.n_documents += 1
        self.stats.n_words += count_words(text)
        self.stats.n_bytes += len(text.encode("utf-8"))

    def finish(self) -> SplitStats:
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            publish(self.temporary, self.final)
        except OSError as error:
            self.abort()
            raise DataError(
                f"{self.final}: could not be completed ({error.strerror}); free "
                "disk space or choose another --path"
            ) from None
        self.stats.sha256 = self._hash.hexdigest()
        return self.stats

    def abort(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        self.temporary.unlink(missing_ok=True)


def _batches(
    documents: Iterable[tuple[str, str]], batch_bytes: int
) -> Iterator[list[tuple[str, str]]]:
    batch, size = [], 0
    for split, text in documents:
        batch.append((split, text))
        size += len(text)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def pack(
    documents: Iterable[tuple[str, str]],
    splits: Sequence[str],
    tokenizer: Tokenizer,
    folder: Path,
    config: PackConfig,
    total_bytes: int | None = None,
) -> dict[str, SplitStats]:
    """Tokenize (split, text) documents and write one token file per split.

    Streams in batches of ~config.batch_bytes, so memory does not grow with the corpus.
    Every split in `splits` gets a file (possibly empty); nothing is renamed into place unless
    the whole pass succeeds, so an interruption leaves only temporary names behind.
    """
    if not config.combine and tokenizer.pad_id < 0:
        raise DataError(
            f"{tokenizer.path}: has no padding piece, which --combine False needs; "
            "use --combine True or a tokenizer trained by download.py"
        )
    dtype = token_dtype(tokenizer.vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    writers = {split: SplitWriter(folder, split, dtype) for split in splits}
    bar = tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc="tokenize",
        leave=False,
        disable=not sys.stderr.isatty(),
    )
    try:
        for batch in _batches(documents, config.batch_bytes):
            encoded = tokenizer.encode_batch([text for _, text in batch], config.n_threads)
            for (split, text), ids in zip(batch, encoded):
                if config.combine:
                    tokens = combine_documents([ids], tokenizer.eod_id)
                else:
                    tokens = pad_document(
                        ids, tokenizer.eod_id, tokenizer.pad_id, config.seq_len
                    ).reshape(-1)
                writers[split].write(tokens, text)
                bar.update(len(text.encode("utf-8")))
        return {split: writer.finish() for split, writer in writers.items()}
    except BaseException:  # KeyboardInterrupt included: leave nothing that looks finished
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.close()
