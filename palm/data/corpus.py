"""Where documents come from: WikiText, local files, or the Python standard library.

A corpus is a set of raw files per split (or one pool of files when the corpus has no official
splits) plus a rule that cuts files into documents. Everything here streams: no function holds
more than one document in memory, so memory stays bounded on a 540 MB corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from palm.errors import DataError

SPLITS = ("train", "validation", "test")
DOCUMENT_MODES = ("auto", "file", "line", "paragraph", "wikitext")
TEXT_SUFFIXES = (".txt", ".tokens", ".raw", ".jsonl")

# WikiText articles start with a level-1 heading line " = Title = " (level 2 is " = = x = = ").
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


@dataclass(frozen=True)
class Corpus:
    name: str  # the output folder name under --path
    # split -> files, for corpora with official splits; else {"train": every file} and
    # has_official_splits False, so --split may carve validation and test from it.
    files: dict[str, tuple[Path, ...]]
    has_official_splits: bool
    documents: str  # how files are cut into documents: one of DOCUMENT_MODES minus "auto"
    info: dict = field(default_factory=dict)  # extra facts for the manifest (python version...)


def open_text(path: Path) -> io.TextIOBase:
    """Open a UTF-8 text file, transparently gunzipping `*.gz`. newline="" keeps "\\r\\n"."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _base_suffix(path: Path) -> str:
    return Path(path.name[:-3]).suffix if path.name.endswith(".gz") else path.suffix


def iter_documents(path: Path, mode: str) -> Iterator[str]:
    """Yield the documents of one file, whose concatenation is the file's text exactly
    (for jsonl: the `text` fields). Empty documents are dropped."""
    try:
        with open_text(path) as handle:
            if _base_suffix(path) == ".jsonl":
                yield from _jsonl_documents(handle, path)
            elif mode == "file":
                text = handle.read()
                if text:
                    yield text
            else:
                yield from _line_documents(handle, mode)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); "
            "convert it to UTF-8 or remove it from the corpus"
        ) from None
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(
            f"{path}: cannot be read ({error}); check the file or re-download it"
        ) from None


def _jsonl_documents(handle: io.TextIOBase, path: Path) -> Iterator[str]:
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(
                f'{path}:{number}: not a JSON object with a "text" field; '
                "every line of a .jsonl corpus must be one"
            ) from None
        if not isinstance(text, str):
            raise DataError(f'{path}:{number}: "text" is not a string')
        if text:
            yield text


def _line_documents(handle: io.TextIOBase, mode: str) -> Iterator[str]:
    """Cut a line stream into documents: every line, blank-line paragraphs, or WikiText articles.

    Lines are read with their "\\n", so joining the documents gives back the file.
    """
    current: list[str] = []
    for line in handle:
        if mode == "line":
            yield line
            continue
        if mode == "wikitext":
            starts_new = _WIKITEXT_TITLE.match(line.rstrip("\n")) is not None
        else:  # paragraph: a non-blank line after a blank one starts a new document
            starts_new = bool(line.strip()) and bool(current) and not current[-1].strip()
        # The blank lines before the first heading stay with the first article.
        if starts_new and any(part.strip() for part in current):
            yield "".join(current)
            current = []
        current.append(line)
    if current:
        yield "".join(current)


def count_words(text: str) -> int:
    """Whitespace-separated words plus one per line: the WikiText convention (an `<eos>` per
    line), so word-level perplexity = exp(NLL / n_words) matches the literature."""
    return len(text.split()) + text.count("\n")


def split_of(text: str, valid_fraction: float, test_fraction: float) -> str:
    """Deterministic split of a document by the hash of its text (--split True).

    Identical documents always land in the same split, so duplicates never straddle train/test.
    """
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    if u < valid_fraction:
        return "validation"
    if u < valid_fraction + test_fraction:
        return "test"
    return "train"


def _split_name(path: Path) -> str | None:
    """Official split a local file's name declares: train.txt, wiki.valid.tokens, test.jsonl..."""
    stem = path.name.removesuffix(".gz")
    stem = Path(stem).stem.lower()
    stem = stem.removeprefix("wiki.")
    return {
        "train": "train",
        "valid": "validation",
        "validation": "validation",
        "dev": "validation",
        "test": "test",
    }.get(stem)


def _is_text_file(path: Path) -> bool:
    return path.is_file() and _base_suffix(path) in TEXT_SUFFIXES


def corpus_name(path: Path) -> str:
    """The dataset name of a local file or folder: its name without .gz and the text suffix."""
    if path.is_dir() or not _base_suffix(path):
        return path.name
    return path.name.removesuffix(".gz")[: -len(_base_suffix(path))]


def local_corpus(path: Path, documents: str) -> Corpus:
    """A local .txt/.tokens/.raw/.jsonl file (gzip allowed) or a folder of them.

    A folder whose files are named after splits (train.txt, valid.txt, test.txt, or WikiText's
    wiki.train.tokens ...) has official splits; any other folder or file is one training pool.
    """
    if not path.exists():
        raise DataError(
            f"{path}: no such file or folder; give --dataset wikitext-103, "
            "wikitext-2, python-stdlib, or the path of a .txt/.jsonl file or folder"
        )
    if path.is_file():
        if not _is_text_file(path):
            raise DataError(
                f"{path}: unsupported file type; use .txt, .tokens, .raw or .jsonl (optionally .gz)"
            )
        files = [path]
    else:
        files = sorted(
            (p for p in path.rglob("*") if _is_text_file(p)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise DataError(f"{path}: folder holds no .txt/.tokens/.raw/.jsonl files")
    named = {f: _split_name(f) for f in files}
    stem = corpus_name(path)
    wikitext_like = all(f.name.startswith("wiki.") for f in files)
    mode = documents if documents != "auto" else ("wikitext" if wikitext_like else "file")
    if path.is_dir() and all(named.values()) and "train" in named.values():
        splits = {s: tuple(f for f in files if named[f] == s) for s in SPLITS}
        return Corpus(stem, {s: fs for s, fs in splits.items() if fs}, True, mode)
    return Corpus(stem, {"train": tuple(files)}, False, mode)


# --- python-stdlib: an offline corpus every Python installation has --------------------------


def stdlib_documents(max_bytes: int) -> tuple[list[dict], dict]:
    """Documents of the Python standard library: module sources and pydoc's topic texts.

    Deterministic: files are taken in the order of sha256 of their path relative to the
    standard library (a fixed pseudo-random order, so a small budget still samples the whole
    library rather than the modules starting with "a"), until `max_bytes` of UTF-8 text.
    The tests package and site-packages are left out: they are not the library, and their
    fixtures include deliberately malformed files. Content depends on the Python version,
    which the manifest records.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates: list[tuple[str, str, Path | None]] = []
    for directory, subdirs, names in os.walk(root):
        rel_dir = Path(directory).relative_to(root).as_posix()
        subdirs[:] = [
            d
            for d in subdirs
            if d
            not in ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__")
        ]
        for name in names:
            if name.endswith(".py"):
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                candidates.append((hashlib.sha256(rel.encode()).hexdigest(), rel, root / rel))
    try:
        from pydoc_data.topics import topics  # the text behind help("topics")
    except ImportError:  # a stripped-down Python; the sources are enough
        topics = {}
    for key in topics:
        rel = f"pydoc_data/topics/{key}"
        candidates.append((hashlib.sha256(rel.encode()).hexdigest(), rel, None))
    candidates.sort()
    docs: list[dict] = []
    total = 0
    for _, rel, file in candidates:
        if file is None:
            text = topics[rel.rsplit("/", 1)[1]]
        else:
            try:
                text = file.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a few legacy-encoded files; skipping them is deterministic too
        size = len(text.encode("utf-8"))
        if not text or total + size > max_bytes:
            continue  # keep looking: a smaller file may still fit the budget
        docs.append({"text": text, "source": rel})
        total += size
    info = {
        "python_version": sys.version.split()[0],
        "stdlib": str(root),
        "n_files": len(docs),
        "n_bytes": total,
        "max_bytes": max_bytes,
    }
    return docs, info
