"""Turning `--dataset` into a `Corpus`: fetch or find the raw files, then describe them.

Raw files live under `<path>/raw/`:
    raw/wikitext-103-raw-v1.zip                        the verified download
    raw/wikitext-103-raw-v1/wikitext-103-raw/wiki.{train,valid,test}.raw   its extraction
    raw/python-stdlib/python-stdlib.jsonl              the collected standard-library corpus
Local-path datasets are read where they are and never copied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from palm.data.corpus import Corpus, corpus_name, local_corpus, stdlib_documents
from palm.errors import DataError
from palm.fetch import FetchConfig, RemoteFile, fetch, mirror_urls, safe_extract
from palm.files import write_atomic

# WikiText (Merity et al. 2016). The original S3 bucket is gone; the author now serves the zips
# from wikitext.smerity.com. The Hugging Face URLs are community re-uploads of the same zips
# (only these two exist as zips there); the checksum is what makes any mirror trustworthy.
WIKITEXT_BASE = "https://wikitext.smerity.com/"
_HF = "https://huggingface.co/datasets/"
WIKITEXT_FILES: dict[str, RemoteFile] = {
    "wikitext-103-raw-v1": RemoteFile(
        "wikitext-103-raw-v1.zip",
        191_984_949,
        "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794",
        (_HF + "mattdangerw/wikitext-103-raw/resolve/main/wikitext-103-raw-v1.zip",),
    ),
    "wikitext-103-v1": RemoteFile(
        "wikitext-103-v1.zip",
        190_229_076,
        "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",
    ),
    "wikitext-2-raw-v1": RemoteFile(
        "wikitext-2-raw-v1.zip",
        4_721_645,
        "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
        (_HF + "ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip",),
    ),
    "wikitext-2-v1": RemoteFile(
        "wikitext-2-v1.zip",
        4_475_746,
        "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c",
    ),
}


@dataclass(frozen=True)
class WikiText:
    variant: str  # key of WIKITEXT_FILES
    inner: str  # folder inside the zip
    suffix: str  # "raw" or "tokens"


# Bare names mean the raw variants: SentencePiece must see the real words, not <unk>.
WIKITEXT_NAMES = {
    "wikitext-103": WikiText("wikitext-103-raw-v1", "wikitext-103-raw", "raw"),
    "wikitext-103-raw-v1": WikiText("wikitext-103-raw-v1", "wikitext-103-raw", "raw"),
    "wikitext-103-v1": WikiText("wikitext-103-v1", "wikitext-103", "tokens"),
    "wikitext-2": WikiText("wikitext-2-raw-v1", "wikitext-2-raw", "raw"),
    "wikitext-2-raw-v1": WikiText("wikitext-2-raw-v1", "wikitext-2-raw", "raw"),
    "wikitext-2-v1": WikiText("wikitext-2-v1", "wikitext-2", "tokens"),
}
_WIKITEXT_SPLIT_FILES = {"train": "train", "validation": "valid", "test": "test"}


@dataclass(frozen=True)
class SourceOptions:
    mirrors: list[str] | None  # base addresses replacing the defaults
    fetch: FetchConfig
    documents: str  # --documents
    max_bytes: int  # python-stdlib budget (and a cap on nothing else)
    force: bool


def dataset_name(dataset: str) -> str:
    """The folder name (under --path) of the dataset `dataset` names."""
    if dataset in WIKITEXT_NAMES or dataset == "python-stdlib":
        return dataset
    return corpus_name(Path(dataset).expanduser())


def resolve(dataset: str, root: Path, options: SourceOptions) -> Corpus:
    """The corpus `dataset` names, with its raw files present and verified."""
    if dataset in WIKITEXT_NAMES:
        return wikitext_corpus(dataset, root / "raw", options)
    if dataset == "python-stdlib":
        return stdlib_corpus(root / "raw" / "python-stdlib", options)
    path = Path(dataset).expanduser()
    if not path.exists() and "/" not in dataset and "." not in dataset:
        names = ", ".join([*WIKITEXT_NAMES, "python-stdlib"])
        raise DataError(
            f"unknown dataset {dataset!r}: use one of {names}, or the path of a "
            ".txt/.jsonl file or folder"
        )
    return local_corpus(path, options.documents)


def wikitext_corpus(name: str, raw: Path, options: SourceOptions) -> Corpus:
    spec = WIKITEXT_NAMES[name]
    remote = WIKITEXT_FILES[spec.variant]
    folder = raw / spec.variant / spec.inner
    files = {
        split: folder / f"wiki.{stem}.{spec.suffix}"
        for split, stem in _WIKITEXT_SPLIT_FILES.items()
    }
    zip_path = raw / remote.name
    if not all(f.exists() for f in files.values()) or options.force:
        print(f"download: {remote.name} ({remote.size / 1e6:.1f} MB)")
        try:
            fetch(remote, raw, mirror_urls(remote, options.mirrors, WIKITEXT_BASE), options.fetch)
        except DataError as error:  # offline, or every mirror failed: say how to go on by hand
            missing = next((f for f in files.values() if not f.exists()), zip_path)
            raise DataError(f"{missing} not found, and {error}") from None
        safe_extract(zip_path, raw / spec.variant)
        for f in files.values():
            if not f.exists():
                raise DataError(f"{zip_path}: archive lacks {f.name}; delete it and re-download")
    else:
        print(f"download: {folder} already holds the {name} splits (skipping)")
    return Corpus(
        name,
        {s: (f,) for s, f in files.items()},
        True,
        "wikitext" if options.documents == "auto" else options.documents,
        {"archive": remote.name, "archive_sha256": remote.sha256},
    )


def stdlib_corpus(folder: Path, options: SourceOptions) -> Corpus:
    """Collect the standard-library corpus once into a .jsonl file (one document per line).

    Collecting needs no network. The file is the raw source
    the manifest hashes; a rerun with the same budget and Python version reuses it.
    """
    out = folder / "python-stdlib.jsonl"
    info_path = folder / "python-stdlib.json"
    docs, info = stdlib_documents(options.max_bytes)
    if not docs:
        raise DataError(
            f"python-stdlib: no standard-library sources found under "
            f"{info['stdlib']}; use another --dataset"
        )
    if out.exists() and info_path.exists() and not options.force:
        try:
            if json.loads(info_path.read_text()) == info:
                print(f"download: {out} is up to date (skipping)")
                return Corpus("python-stdlib", {"train": (out,)}, False, "file", info)
        except (OSError, json.JSONDecodeError):
            pass  # unreadable sidecar: rebuild
    folder.mkdir(parents=True, exist_ok=True)
    print(
        f"download: collecting {info['n_files']} standard-library texts "
        f"({info['n_bytes'] / 1e6:.1f} MB, Python {info['python_version']}) into {out}"
    )
    write_dataset_file(out, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    write_dataset_file(info_path, json.dumps(info, indent=2) + "\n")
    return Corpus("python-stdlib", {"train": (out,)}, False, "file", info)


def write_dataset_file(path: Path, data: str | bytes) -> None:
    """`palm.files.write_atomic`, with a failure (a full disk) reported as a DataError."""
    try:
        write_atomic(path, data)
    except OSError as error:
        raise DataError(
            f"{path}: cannot write ({error.strerror}); free disk space or choose another --path"
        ) from None
