"""Fetching files over HTTP, done properly, and unpacking archives safely (no dataset names here).

A download goes to `NAME.part`, resumes with an HTTP Range request after a cut, retries with
exponential backoff, falls through to the next mirror on a 404 or a bad checksum, and is renamed
to `NAME` only after its sha256 matches. So a file without `.part` is always complete and
verified, and an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import http.client
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from palm.errors import DataError
from palm.files import publish, sha256_file

# The author's host refuses Python's default User-Agent ("Python-urllib/3.x").
USER_AGENT = "palm-lm/0.1 (+https://github.com; python-urllib)"
CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    name: str  # file name on every mirror and on disk
    size: int  # bytes
    sha256: str
    fallback_urls: tuple[str, ...] = ()  # full URLs tried after the base-address mirrors


@dataclass(frozen=True)
class FetchConfig:
    retries: int = 5  # attempts per mirror for transient failures (cuts, timeouts, 5xx)
    backoff_s: float = 1.0  # first wait between attempts; doubles each time
    timeout_s: float = 30.0  # socket timeout per read
    progress: bool = True  # tqdm bar on stderr with bytes, rate and ETA


def mirror_urls(remote: RemoteFile, bases: list[str] | None, default_base: str) -> list[str]:
    """URLs to try in order: each base address + name, then the built-in fallbacks.

    `bases` given (by --mirror or PALM_DATA_MIRRORS) replaces `default_base` and the fallbacks
    entirely, so a test or an offline mirror never reaches the internet by accident.
    """
    if bases:
        return [base.rstrip("/") + "/" + remote.name for base in bases]
    return [default_base.rstrip("/") + "/" + remote.name, *remote.fallback_urls]


def _permanent(error: Exception) -> bool:
    """An HTTP answer that asking again cannot change (404, 403, ...; not 408 or 429)."""
    return (
        isinstance(error, urllib.error.HTTPError)
        and 400 <= error.code < 500
        and error.code not in (408, 429)
    )


class _Permanent(Exception):
    """A failure retrying the same URL cannot fix (404, bad checksum): go to the next mirror."""


def fetch(
    remote: RemoteFile, dest_dir: Path, urls: list[str], config: FetchConfig = FetchConfig()
) -> Path:
    """Download `remote` into `dest_dir`, verified; return its path. Skips a verified file."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / remote.name
    if final.exists():
        if final.stat().st_size == remote.size and sha256_file(final) == remote.sha256:
            return final
        raise DataError(
            f"{final}: exists but its size or sha256 is not the published one; "
            "delete it and rerun to download it again"
        )
    part = dest_dir / (remote.name + ".part")
    failures: list[str] = []
    for url in urls:
        try:
            _fetch_one(url, remote, part, config)
        except _Permanent as why:
            failures.append(f"{url}: {why}")
            print(f"download: {url}: {why}; trying the next mirror", file=sys.stderr)
            continue
        except _Transient as why:
            failures.append(f"{url}: {why}")
            print(
                f"download: {url}: giving up after {config.retries} attempts ({why})",
                file=sys.stderr,
            )
            continue
        publish(part, final)  # atomic: the checksum has already matched
        return final
    raise DataError(
        f"could not download {remote.name} ({'; '.join(failures)}); place it by hand at "
        f"{final} (sha256 {remote.sha256}) or its extracted files under {dest_dir}, then rerun"
    )


class _Transient(Exception):
    pass


def _fetch_one(url: str, remote: RemoteFile, part: Path, config: FetchConfig) -> None:
    """Bring `part` to the full verified file from one URL, resuming what is already there."""
    wait = config.backoff_s
    for attempt in range(1, config.retries + 1):
        try:
            _transfer(url, remote, part, config)
            break
        except _Permanent:
            raise
        except (urllib.error.URLError, http.client.HTTPException, OSError, _Transient) as error:
            reason = getattr(error, "reason", None) or error
            if _permanent(error):
                raise _Permanent(f"HTTP {error.code}") from None
            if attempt == config.retries:
                raise _Transient(str(reason)) from None
            print(
                f"download: {url}: {reason}; retry {attempt}/{config.retries - 1} in "
                f"{wait:.1f}s (resuming at {_size(part):,} bytes)",
                file=sys.stderr,
            )
            time.sleep(wait)
            wait *= 2
    digest = sha256_file(part)
    if digest != remote.sha256:
        part.unlink()
        raise _Permanent(
            f"sha256 mismatch (got {digest[:16]}..., expected "
            f"{remote.sha256[:16]}...); deleted the partial file"
        )


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _transfer(url: str, remote: RemoteFile, part: Path, config: FetchConfig) -> None:
    have = _size(part)
    if have > remote.size:  # a stale part from a different file: start again
        part.unlink()
        have = 0
    if have == remote.size:
        return
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
        if have and response.status != 206:  # server ignored the Range header: start over
            have = 0
        mode = "ab" if have else "wb"
        bar = tqdm(
            total=remote.size,
            initial=have,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=remote.name,
            disable=not config.progress,
            file=sys.stderr,
            leave=False,
        )
        with open(part, mode) as out, bar:
            while block := response.read(CHUNK):
                out.write(block)
                bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
    got = _size(part)
    if got < remote.size:
        raise _Transient(f"connection closed at {got:,} of {remote.size:,} bytes")
    if got > remote.size:
        part.unlink()
        raise _Permanent(f"served {got:,} bytes, expected {remote.size:,}")


def safe_extract(archive: Path, target: Path) -> list[Path]:
    """Extract a zip into `target`, refusing any member that would land outside it.

    Extraction goes to a temporary sibling folder renamed into place at the end, so a
    half-extracted archive never looks finished.
    """
    target = target.resolve()
    staging = target.with_name(target.name + ".extracting")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            for name in names:
                destination = (staging / name).resolve()
                if not destination.is_relative_to(staging.resolve()):
                    raise DataError(
                        f"{archive}: member {name!r} would be written outside "
                        f"{target}; refusing to extract this archive"
                    )
            zf.extractall(staging)
    except zipfile.BadZipFile:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"{archive}: not a valid zip; delete it and download it again") from None
    except DataError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    publish(staging, target)
    return [target / name for name in names]


def fetch_small(urls: list[str], config: FetchConfig = FetchConfig()) -> bytes:
    """The body of a small file (an index, a manifest) from the first URL that serves it, with
    the same retries as `fetch`; the caller verifies what it got."""
    failures = []
    for url in urls:
        wait = config.backoff_s
        for attempt in range(1, config.retries + 1):
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            try:
                with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
                    return response.read()
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                if _permanent(error) or attempt == config.retries:
                    reason = f"HTTP {error.code}" if _permanent(error) else error
                    failures.append(f"{url}: {getattr(error, 'reason', None) or reason}")
                    break
                time.sleep(wait)
                wait *= 2
    raise DataError(f"could not fetch {'; '.join(failures)}")
