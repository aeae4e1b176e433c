"""The preparation steps behind download.py: source -> tokenizer -> token files -> manifest.

Each step says what it does, and skips (saying so) when its output is already complete and
matches its inputs, unless `force`. Outputs go to temporary names and are renamed when complete,
and meta.json is written last: a folder with meta.json is finished, one without is not.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece

from palm.data.corpus import Corpus
from palm.data.manifest import META_NAME, Manifest, load_manifest
from palm.data.pack import PackConfig, pack, token_dtype
from palm.data.sources import SourceOptions, resolve, write_dataset_file
from palm.data.splits import SplitPlan, labeled_documents, output_splits, plan_splits
from palm.errors import DataError
from palm.files import remove, sha256_file, stale
from palm.tokenizer import Tokenizer, TokenizerTrainConfig, train_sentencepiece, vocab_file_text


@dataclass(frozen=True)
class PrepareConfig:
    root: Path  # --path: the data root; outputs go to <root>/<dataset name>/
    dataset: str  # --dataset
    source: SourceOptions  # how raw files are found or fetched
    tokenize: bool  # train (or take --tokenizer) a tokenizer
    process: bool  # write token files and meta.json
    combine: bool  # PaLM §5 packing (True) or one padded row per document start (False)
    split: bool  # carve validation/test from a corpus without official splits
    valid_fraction: float  # of documents, by hash, when split
    test_fraction: float
    seq_len: int  # recorded default; the padded layout is also cut to it
    batch_size: int  # recorded default global batch, in sequences
    vocab_size: int  # pieces of a trained tokenizer
    model_type: str  # SentencePiece "unigram" or "bpe"
    tokenizer_path: Path | None  # use this SentencePiece model instead of training
    tokenizer_sample_bytes: int  # at most this much training text goes to the trainer
    vocab_file: Path | None  # also write the vocabulary here, one piece per line
    n_workers: int  # threads for training and encoding
    force: bool  # redo finished steps

    def __post_init__(self) -> None:
        for name in ("valid_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise DataError(f"--{name} must be in [0, 1), not {getattr(self, name)}")
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise DataError("--valid_fraction + --test_fraction must leave some training data")
        if min(self.seq_len, self.batch_size, self.n_workers, self.tokenizer_sample_bytes) < 1:
            raise DataError(
                "--seq_len, --batch_size, --n_workers and --tokenizer_sample_bytes must be >= 1"
            )


def training_lines(corpus: Corpus, config: PrepareConfig, plan: SplitPlan) -> Iterator[str]:
    """The lines SentencePiece trains on: every training line, or a deterministic sample.

    Sampling keeps a line when crc32(line) falls under keep * 2^32, so memory is bounded by
    --tokenizer_sample_bytes whatever the corpus size, and the sample is the same everywhere.
    """
    total = sum(p.stat().st_size for p in corpus.files["train"])
    keep = min(1.0, config.tokenizer_sample_bytes / max(1, total))
    threshold = int(keep * 2**32)
    for _, text in labeled_documents(corpus, plan, only_train=True):
        for line in text.split("\n"):
            if line and (keep >= 1.0 or zlib.crc32(line.encode("utf-8")) < threshold):
                yield line


def prepare_tokenizer(
    corpus: Corpus, config: PrepareConfig, plan: SplitPlan, out: Path
) -> tuple[Tokenizer, dict]:
    """Step 2: tokenizer.model in the dataset folder: given, kept, or trained (PaLM §2)."""
    target = out / "tokenizer.model"
    if config.tokenizer_path is not None:
        tokenizer = Tokenizer.load(config.tokenizer_path)
        if not target.exists() or sha256_file(target) != tokenizer.sha256:
            write_dataset_file(target, tokenizer.model_bytes)
        print(f"tokenizer: using {config.tokenizer_path} ({tokenizer.vocab_size} pieces)")
        how = {"given": str(config.tokenizer_path)}
    elif target.exists() and not config.force:
        tokenizer = Tokenizer.load(target)
        if config.tokenize and tokenizer.vocab_size != config.vocab_size:
            raise DataError(
                f"{target}: has {tokenizer.vocab_size} pieces, not --vocab_size "
                f"{config.vocab_size}; add --force to retrain it"
            )
        print(f"tokenizer: {target} exists (skipping training; --force retrains)")
        how = _previous_tokenizer_info(out, tokenizer)
    elif config.tokenize:
        train_config = TokenizerTrainConfig(config.vocab_size, config.model_type, config.n_workers)
        print(
            f"tokenizer: training a {config.model_type} SentencePiece model of "
            f"{config.vocab_size} pieces on {corpus.name} train "
            f"(at most {config.tokenizer_sample_bytes / 1e6:.0f} MB sampled)"
        )
        started = time.perf_counter()
        model = train_sentencepiece(training_lines(corpus, config, plan), train_config)
        write_dataset_file(target, model)
        tokenizer = Tokenizer.load(target)
        how = {
            "trained_on": f"{corpus.name}/train",
            "model_type": config.model_type,
            "sample_bytes": config.tokenizer_sample_bytes,
            "train_seconds": round(time.perf_counter() - started, 2),
        }
        print(f"tokenizer: trained in {how['train_seconds']:.1f}s -> {target}")
    else:
        raise DataError(
            f"{target}: not found and --tokenize is False; use --tokenize True "
            "to train one or --tokenizer PATH to use yours"
        )
    if tokenizer.eod_id < 0:
        raise DataError(
            f"{target}: has no end-of-document piece (eos), which packing needs; "
            "train one with download.py --tokenize True"
        )
    if config.vocab_file is not None:
        write_dataset_file(config.vocab_file, vocab_file_text(tokenizer))
        print(f"tokenizer: vocabulary ({tokenizer.vocab_size} lines) -> {config.vocab_file}")
    return tokenizer, {"path": target.name, "vocab_size": tokenizer.vocab_size, **how}


def _previous_tokenizer_info(out: Path, tokenizer: Tokenizer) -> dict:
    try:
        info = load_manifest(out).tokenizer
        return {k: v for k, v in info.items() if k not in ("path", "vocab_size")}
    except DataError:
        return {"kept": True}


def source_records(corpus: Corpus) -> list[dict]:
    return [
        {"split": split, "path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for split, files in corpus.files.items()
        for p in files
    ]


def fingerprint(
    config: PrepareConfig,
    corpus: Corpus,
    plan: SplitPlan,
    sources: list[dict],
    tokenizer: Tokenizer,
) -> str:
    """Hash of everything the token files depend on; equal hashes mean the files can be kept."""
    facts = {
        "sources": [s["sha256"] for s in sources],
        "tokenizer": tokenizer.sha256,
        "combine": config.combine,
        "seq_len": None if config.combine else config.seq_len,
        "split": output_splits(corpus, plan),
        "documents": corpus.documents,
        "fractions": [config.valid_fraction, config.test_fraction] if config.split else None,
    }
    if plan.method == "cut":  # (a key only then: earlier fingerprints stay valid)
        facts["split_method"] = plan.describe()
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _finished(out: Path, print_: str) -> Manifest | None:
    try:
        manifest = load_manifest(out)
    except DataError:
        return None
    for info in manifest.splits.values():
        path = out / info["path"]
        if (
            not path.exists()
            or path.stat().st_size != info["n_tokens"] * np.dtype(manifest.dtype).itemsize
        ):
            return None
    return manifest if manifest.fingerprint == print_ else None


def process(
    corpus: Corpus,
    config: PrepareConfig,
    plan: SplitPlan,
    out: Path,
    tokenizer: Tokenizer,
    tokenizer_info: dict,
) -> Manifest:
    """Steps 3-4: the token files of every split, then meta.json."""
    sources = source_records(corpus)
    print_ = fingerprint(config, corpus, plan, sources, tokenizer)
    previous = _finished(out, print_) if not config.force else None
    if previous is not None:
        print(f"process: token files in {out} are up to date (skipping; --force redoes them)")
        splits = previous.splits
    else:
        total = sum(s["bytes"] for s in sources)
        print(
            f"process: tokenizing {total / 1e6:.1f} MB with {config.n_workers} threads "
            f"({'combined with <eod>' if config.combine else 'padded'} layout)"
        )
        started = time.perf_counter()
        stats = pack(
            labeled_documents(corpus, plan),
            output_splits(corpus, plan),
            tokenizer,
            out,
            PackConfig(config.combine, config.seq_len, config.n_workers),
            total,
        )
        seconds = time.perf_counter() - started
        splits = {name: vars(s) for name, s in stats.items()}
        for name, s in splits.items():
            print(
                f"process: {name:<10} {s['n_tokens']:>12,} tokens {s['n_documents']:>9,} "
                f"documents -> {out / s['path']}"
            )
        print(f"process: {total / 1e6 / seconds:.1f} MB/s")
    for name, s in splits.items():
        if s["n_tokens"] == 0:
            print(f"process: warning: split {name!r} is empty", file=sys.stderr)
    manifest = Manifest(
        dataset=config.dataset,
        vocab_size=tokenizer.vocab_size,
        dtype=token_dtype(tokenizer.vocab_size).name,
        eod_id=tokenizer.eod_id,
        pad_id=tokenizer.pad_id,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        layout="combined" if config.combine else "padded",
        splits=splits,
        tokenizer_sha256=tokenizer.sha256,
        tokenizer=tokenizer_info,
        sources=sources,
        corpus={
            "name": corpus.name,
            "documents": corpus.documents,
            "official_splits": corpus.has_official_splits,
            **corpus.info,
            **(
                {
                    "valid_fraction": config.valid_fraction,
                    "test_fraction": config.test_fraction,
                    "split": plan.describe(),
                }
                if config.split
                else {}
            ),
        },
        fingerprint=print_,
        versions={
            "python": platform.python_version(),
            "numpy": np.__version__,
            "sentencepiece": sentencepiece.__version__,
        },
    )
    write_dataset_file(out / META_NAME, manifest.to_json())
    print(f"process: manifest -> {out / META_NAME}")
    return manifest


def prepare(config: PrepareConfig) -> Path:
    """Run every requested step; return the dataset folder."""
    corpus = resolve(config.dataset, config.root, config.source)
    if config.split and corpus.has_official_splits:
        raise DataError(
            f"{corpus.name} has official splits ({', '.join(corpus.files)}); "
            "--split True would mix them, use --split False"
        )
    out = config.root / corpus.name
    out.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(out)
    if not (config.tokenize or config.process or config.tokenizer_path):
        print("nothing to do after the download: --tokenize and --process are False")
        return out
    plan = plan_splits(corpus, config.split, config.valid_fraction, config.test_fraction)
    tokenizer, tokenizer_info = prepare_tokenizer(corpus, config, plan, out)
    if config.process:
        process(corpus, config, plan, out, tokenizer, tokenizer_info)
    return out


def _clean_temporaries(out: Path) -> None:
    """Remove what interrupted runs left under temporary names."""
    for leftover in stale(out):
        remove(leftover)
