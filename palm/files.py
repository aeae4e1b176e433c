"""Writing files so that a crash never leaves a half-written one: the single atomic writer.

Every file the project writes goes to a temporary name in the same folder, is fsynced, renamed
over its final name and the folder fsynced, so readers see the old file or the new one, and
`kill -9` or a full disk at any moment loses nothing that was finished. Temporary names match
`TEMPORARY_GLOB`, so a later run can remove what an interrupted one left.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TEMPORARY_GLOB = ".*.tmp-*"
_CHUNK = 1 << 20


def temporary_path(path: Path) -> Path:
    """The temporary sibling `path` is written under (unique per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def publish(temporary: Path, final: Path) -> None:
    """Rename a finished (already fsynced) file or folder to its final name, durably."""
    os.replace(temporary, final)
    fsync_dir(final.parent)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary handle whose contents appear at `path` only if the block finishes.

    On any exception (including KeyboardInterrupt) the temporary file is removed and the
    exception propagates; `path` keeps whatever it held before.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        publish(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` atomically; OSError propagates after clean-up."""
    with atomic_file(path) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()
