"""`python3 download.py ...` / `palm download ...`: download, tokenize and pack a corpus
(palm.data.pipeline), then optionally fetch and convert pretrained weights (palm.pretrained).

Exit status (every command alike): 0 done; 1 a step failed (one `error:` line naming the file
and the fix); 2 a bad command line; 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from palm.cli import run
from palm.data.corpus import DOCUMENT_MODES
from palm.data.pipeline import PrepareConfig, prepare
from palm.data.prepared import download_prepared, export_prepared
from palm.data.sources import SourceOptions, dataset_name
from palm.fetch import FetchConfig
from palm.hub import hub_download, progress_config
from palm.pretrained import (
    DEFAULT_PRETRAINED,
    FINAL_NORM_CHOICES,
    NEOX_TOKENIZER,
    PRETRAINED,
    install,
)

MIRRORS_ENV = "PALM_DATA_MIRRORS"  # comma-separated base addresses, like --mirror

_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def str2bool(value: str) -> bool:
    """True/False/true/false/1/0/yes/no; anything else is a usage error."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/true/false/1/0/yes/no, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="download.py",
        allow_abbrev=False,
        description="Download a corpus, train a lossless SentencePiece tokenizer (PaLM §2) and "
        "pack it into flat token files with a manifest (PaLM §5). Outputs go to "
        "PATH/DATASET/: tokenizer.model, train.bin, validation.bin, test.bin, "
        "meta.json. Raw downloads go to PATH/raw/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b = {"type": str2bool, "metavar": "BOOL"}
    p.add_argument("--path", type=Path, default=Path("data"), help="data root folder")
    p.add_argument(
        "--dataset",
        required=True,
        help="wikitext-103 | wikitext-2 (raw text) | wikitext-103-v1 | wikitext-2-v1 "
        "(<unk>-tokenized variants) | python-stdlib (offline: this Python's "
        "standard library) | a .txt/.tokens/.raw/.jsonl file or folder (gzip ok)",
    )
    p.add_argument(
        "--download_data",
        default=False,
        **b,
        help="download the PREPARED dataset (token files, tokenizer, meta.json) from --mirror "
        "instead of building it; False builds it here, fetching its raw corpus if not on disk",
    )
    p.add_argument(
        "--export_prepared",
        type=Path,
        default=None,
        metavar="DIR",
        help="after building (or from an existing PATH/DATASET/), write DIR/DATASET/ with an "
        "index.json, ready to serve from any static HTTP host for --download_data True",
    )
    p.add_argument(
        "--tokenize",
        default=True,
        **b,
        help="train a SentencePiece tokenizer on the training split (or take "
        "--tokenizer) and write tokenizer.model (and --vocab_file)",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        metavar="PATH",
        help="use this SentencePiece .model instead of training one",
    )
    p.add_argument(
        "--vocab_size",
        type=int,
        default=32768,
        help="pieces of the trained tokenizer, 4 specials and 256 bytes included",
    )
    p.add_argument(
        "--vocab_file",
        type=Path,
        default=None,
        help="also write the vocabulary here: one piece per line in id order "
        "(newline and backslash escaped as \\n and \\\\)",
    )
    p.add_argument(
        "--model_type",
        choices=("unigram", "bpe"),
        default="unigram",
        help="SentencePiece algorithm (unigram encodes ~4x faster here)",
    )
    p.add_argument(
        "--tokenizer_sample_bytes",
        type=int,
        default=64_000_000,
        help="train the tokenizer on a deterministic sample of at most this many "
        "bytes of training lines, which bounds its memory and time",
    )
    p.add_argument(
        "--combine",
        default=True,
        **b,
        help="PaLM §5: concatenate documents with <eod> between them and cut "
        "windows anywhere (no padding). False: every document starts a new "
        "sequence of seq_len+1 tokens, the rest padded and left out of the loss",
    )
    p.add_argument(
        "--split",
        default=False,
        **b,
        help="carve validation and test splits, by document hash, from a corpus "
        "that has none (an error for WikiText, which has official splits)",
    )
    p.add_argument(
        "--valid_fraction",
        type=float,
        default=0.01,
        help="fraction of documents for validation when --split True",
    )
    p.add_argument(
        "--test_fraction",
        type=float,
        default=0.01,
        help="fraction of documents for test when --split True",
    )
    p.add_argument(
        "--documents",
        default="auto",
        choices=DOCUMENT_MODES,
        help="how text files are cut into documents; auto: WikiText articles for "
        "WikiText, one document per file otherwise (.jsonl: one per record)",
    )
    p.add_argument("--process", default=True, **b, help="write the token files and meta.json")
    p.add_argument(
        "--seq_len",
        type=int,
        default=256,
        help="default training sequence length recorded in meta.json (and the row "
        "length of the --combine False layout)",
    )
    p.add_argument(
        "--batch_size",
        type=int,
        default=256,
        help="default global batch size (sequences) recorded in meta.json",
    )
    p.add_argument(
        "--n_workers",
        type=int,
        default=max(1, min(8, os.cpu_count() or 1)),
        help="threads for tokenizer training and encoding (SentencePiece's own "
        "thread pool, which releases the GIL)",
    )
    p.add_argument(
        "--max_bytes",
        type=int,
        default=16_000_000,
        help="python-stdlib: bytes of library text to collect (deterministic choice)",
    )
    p.add_argument(
        "--mirror",
        action="append",
        default=None,
        metavar="URL",
        help=f"base address to download from (repeat for fallbacks; also ${MIRRORS_ENV}, "
        f"comma-separated): raw corpora replace the built-in hosts; prepared datasets "
        f"(--download_data True) are read from URL/DATASET/",
    )
    p.add_argument("--retries", type=int, default=5, help="attempts per mirror")
    p.add_argument("--force", action="store_true", help="redo finished steps")
    p.add_argument(
        "--download_models",
        default=False,
        **b,
        help="use the published tokenizer of --pretrained (the GPT-NeoX-20B tokenizer.json, "
        "from the Hugging Face hub) instead of training one, so the data fits the pretrained "
        "weights (fine-tuning)",
    )
    p.add_argument(
        "--download_scripts",
        default=False,
        **b,
        help="reserved: there are no extra scripts to fetch, so True is an error",
    )
    p.add_argument(
        "--download_pretrained",
        default=False,
        **b,
        help="after preparing the data, fetch the --pretrained weights and their tokenizer, "
        "convert them and write the run folder PATH/pretrained/NAME/ (checkpoints/step_00000000 "
        "+ tokenizer) for generate.py, evaluate.py and fine-tuning",
    )
    p.add_argument(
        "--pretrained",
        default=DEFAULT_PRETRAINED,
        choices=sorted(PRETRAINED),
        help="published checkpoint (conceptofmind/PaLM: C4, 8k context, GPT-NeoX tokenizer); "
        "hub access honours HF_ENDPOINT, HF_HOME/HF_HUB_CACHE and HF_HUB_OFFLINE=1",
    )
    p.add_argument(
        "--pretrained_final_norm",
        default="auto",
        choices=FINAL_NORM_CHOICES,
        help="apply the final LayerNorm; auto: only if its gain was trained (checkpoints trained "
        "with palm-rlhf-pytorch <= 0.2.0 never used it)",
    )
    return p


def download_pretrained(args: argparse.Namespace) -> None:
    """Fetch, verify and convert the --pretrained weights into PATH/pretrained/NAME/."""
    install(
        args.pretrained,
        args.path,
        dict(os.environ),
        progress_config(args.retries),
        args.pretrained_final_norm,
    )


def download_tokenizer(args: argparse.Namespace) -> Path:
    """--download_models True: the published tokenizer.json, through the Hugging Face cache."""
    path, _ = hub_download(NEOX_TOKENIZER, dict(os.environ), progress_config(args.retries))
    return path


def mirrors_from(args: argparse.Namespace, environ: dict[str, str]) -> list[str]:
    return args.mirror or [u.strip() for u in environ.get(MIRRORS_ENV, "").split(",") if u.strip()]


def config_from_args(args: argparse.Namespace, environ: dict[str, str]) -> PrepareConfig:
    mirrors = mirrors_from(args, environ)
    source = SourceOptions(
        mirrors=mirrors or None,
        fetch=FetchConfig(retries=max(1, args.retries), progress=sys.stderr.isatty()),
        documents=args.documents,
        max_bytes=args.max_bytes,
        force=args.force,
    )
    return PrepareConfig(
        root=args.path,
        dataset=args.dataset,
        source=source,
        tokenize=args.tokenize,
        process=args.process,
        combine=args.combine,
        split=args.split,
        valid_fraction=args.valid_fraction,
        test_fraction=args.test_fraction,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        tokenizer_path=args.tokenizer,
        tokenizer_sample_bytes=args.tokenizer_sample_bytes,
        vocab_file=args.vocab_file,
        n_workers=args.n_workers,
        force=args.force,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.download_models and (args.tokenizer is not None or not args.tokenize):
        parser.error(
            "--download_models True supplies the tokenizer: it needs --tokenize True "
            "and no --tokenizer PATH"
        )
    if args.download_scripts:
        parser.error(
            "--download_scripts True: there are no scripts to fetch; every "
            "preparation step is built into palm.data, so pass False"
        )
    if args.tokenizer is not None and not args.tokenize:
        parser.error("--tokenizer PATH needs --tokenize True (it replaces training)")
    return run(
        lambda: download(args),
        interrupted="interrupted: finished files are intact, unfinished ones were left under "
        "temporary names and are removed on the next run",
    )


def download(args: argparse.Namespace) -> None:
    environ = dict(os.environ)
    name = dataset_name(args.dataset)
    if args.download_data:  # a prepared dataset: the build steps do not run
        fetch_config = FetchConfig(retries=max(1, args.retries), progress=sys.stderr.isatty())
        download_prepared(name, args.path, mirrors_from(args, environ), fetch_config)
        skipped = [
            flag for flag in ("tokenize", "process", "download_models") if getattr(args, flag)
        ]
        if skipped:
            print(
                "download: --download_data True took the prepared dataset, so the build steps "
                f"({', '.join('--' + f for f in skipped)}) were skipped"
            )
    else:
        if args.download_models:
            args.tokenizer = download_tokenizer(args)
        prepare(config_from_args(args, environ))
    if args.export_prepared is not None:
        export_prepared(args.path / name, args.export_prepared)
    if args.download_pretrained:
        download_pretrained(args)


if __name__ == "__main__":
    sys.exit(main())
