"""Prepared datasets as artifacts: export a finished `data/NAME/` folder for any static HTTP host,
and download one instead of building it (`--download_data True`).

Prepare once, then every node of a cluster downloads the identical token files instead of
re-tokenising, which the loader's determinism across nodes relies on. An exported folder is
`NAME/` with the dataset's files and `index.json` (size and sha256 of each, meta.json included).
A download fetches index.json, then meta.json (checked against the index), then every file
named in meta.json, each verified against the sha256 meta.json records, resumable and atomic;
meta.json is written last, so a folder with it is complete, as with a built one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from palm.data.manifest import META_NAME, Manifest, load_manifest, parse_manifest
from palm.errors import DataError
from palm.fetch import FetchConfig, RemoteFile, fetch, fetch_small
from palm.files import atomic_file, sha256_file, write_atomic

INDEX_NAME = "index.json"
INDEX_FORMAT = 1


def dataset_files(manifest: Manifest, folder: Path) -> dict[str, str]:
    """file name -> the sha256 meta.json records for it (tokenizer and every split)."""
    files = {"tokenizer.model": manifest.tokenizer_sha256} if manifest.tokenizer_sha256 else {}
    for split, info in manifest.splits.items():
        files[manifest.split_path(folder, split).name] = info.get("sha256", "")
    return files


def check_files(folder: Path, manifest: Manifest) -> None:
    """Every file of a prepared folder has the sha256 meta.json records."""
    for name, digest in dataset_files(manifest, folder).items():
        path = folder / name
        if not path.is_file() or (digest and sha256_file(path) != digest):
            raise DataError(
                f"{path}: missing or not the sha256 {folder / META_NAME} records; rebuild it "
                f"(download.py --force) or download it again"
            )


def export_prepared(folder: Path, out: Path) -> Path:
    """Copy the finished dataset `folder` to out/NAME/ with its index.json; returns that folder."""
    manifest = load_manifest(folder)
    check_files(folder, manifest)  # never publish a damaged dataset
    target = out / folder.name
    target.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name in [*dataset_files(manifest, folder), META_NAME]:
        source, destination = folder / name, target / name
        if not (destination.is_file() and sha256_file(destination) == sha256_file(source)):
            with open(source, "rb") as reader, atomic_file(destination) as writer:
                shutil.copyfileobj(reader, writer, 1 << 20)
        entries[name] = {"size": destination.stat().st_size, "sha256": sha256_file(destination)}
    index = {"format": INDEX_FORMAT, "dataset": folder.name, "files": entries}
    write_atomic(target / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    print(f"export: {folder} -> {target} ({len(entries)} files and {INDEX_NAME}); serve {out}")
    return target


def download_prepared(name: str, root: Path, mirrors: list[str], config: FetchConfig) -> Path:
    """Download the prepared dataset `name` into root/name/ from the first base address that
    serves it (`BASE/name/index.json`); returns the folder. A complete, verified copy is kept."""
    if not mirrors:
        raise DataError(
            "--download_data True downloads a prepared dataset, so it needs --mirror URL (or "
            "$PALM_DATA_MIRRORS): a static host serving the output of download.py "
            "--export_prepared; to build the dataset here instead, use --download_data False"
        )
    dest = root / name
    if (dest / META_NAME).is_file():
        try:
            check_files(dest, load_manifest(dest))
            print(f"download: {dest} is complete and verified (skipping)")
            return dest
        except DataError:
            pass  # damaged or partial: download again

    def urls(file: str) -> list[str]:
        return [f"{base.rstrip('/')}/{name}/{file}" for base in mirrors]

    try:
        index = json.loads(fetch_small(urls(INDEX_NAME), config))
        entries = index["files"]
        meta_entry = entries[META_NAME]
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{urls(INDEX_NAME)[0]}: not a prepared-dataset index ({error})") from None
    meta_bytes = fetch_small(urls(META_NAME), config)
    if hashlib.sha256(meta_bytes).hexdigest() != meta_entry["sha256"]:
        raise DataError(f"{urls(META_NAME)[0]}: its sha256 is not the one {INDEX_NAME} lists")
    try:
        raw = json.loads(meta_bytes)
    except ValueError as error:
        raise DataError(f"{urls(META_NAME)[0]}: not JSON ({error})") from None
    manifest = parse_manifest(raw, urls(META_NAME)[0], "serve download.py --export_prepared output")
    dest.mkdir(parents=True, exist_ok=True)
    files = dataset_files(manifest, dest)
    print(f"download: prepared {name} ({len(files)} files) from {mirrors[0]}")
    for file, digest in files.items():
        if file not in entries or not digest:
            raise DataError(f"{urls(INDEX_NAME)[0]}: lists no size or sha256 for {file}")
        remote = RemoteFile(file, int(entries[file]["size"]), digest)
        if (dest / file).is_file() and sha256_file(dest / file) != digest:
            (dest / file).unlink()  # a stale copy of another version: fetch it again
        fetch(remote, dest, urls(file), config)
    write_atomic(dest / META_NAME, meta_bytes)  # last: the folder is now complete
    return dest
