"""Writing files so that a crash never leaves a half-written one: the single atomic writer.

Every file the project writes goes to a temporary name in the same folder, is fsynced, renamed
over its final name and the folder fsynced, so readers see the old file or the new one, and
`kill -9` or a full disk at any moment loses nothing that was finished. Folders are removed the
same way round: renamed out of sight first (`discard`), then deleted. Temporary and trash names
carry the writer's process id, so a later run removes exactly what dead writers left (`stale`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TEMPORARY_GLOB = ".*.tmp-*"
TRASH_GLOB = ".*.trash-*"
_LEFTOVER = re.compile(r"^\..+\.(tmp|trash)-(\d+)$")
_CHUNK = 1 << 20
_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths in one atomic step


def temporary_path(path: Path) -> Path:
    """The temporary sibling `path` is written under (unique per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def trash_path(path: Path) -> Path:
    """Where `discard` moves `path` before deleting it."""
    return path.with_name(f".{path.name}.trash-{os.getpid()}")


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


def publish_dir(temporary: Path, final: Path) -> None:
    """Put a finished folder at `final`, replacing one that is there, so that `final` never
    stops existing: on Linux both are swapped in one step (renameat2 RENAME_EXCHANGE) and the
    old one is discarded; elsewhere the old one is discarded first (a moment with neither)."""
    if final.exists() and _exchange(temporary, final):
        fsync_dir(final.parent)
        discard(temporary)  # now holds the old folder
        return
    if final.exists():
        discard(final)
    publish(temporary, final)


@functools.cache
def _renameat2():
    """libc's renameat2, or None where there is none (not Linux, old glibc)."""
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


def _exchange(a: Path, b: Path) -> bool:
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_cwd = -100  # AT_FDCWD
    result = renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # this filesystem or kernel cannot exchange
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def discard(path: Path) -> None:
    """Remove a folder (or file) without ever leaving it half-deleted under its name: one
    atomic rename out of sight, then the deletion."""
    trash = trash_path(path)
    os.replace(path, trash)
    fsync_dir(path.parent)
    remove(trash)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def writer_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (it may still be writing its temporaries)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def stale(folder: Path) -> list[Path]:
    """Temporary and trash entries in `folder` whose writer is no longer running. Call it before
    this process writes there: its own leftovers (an earlier, interrupted attempt) count too."""
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        match = _LEFTOVER.match(entry.name)
        pid = int(match.group(2)) if match else 0
        if match and (pid == os.getpid() or not writer_alive(pid)):
            found.append(entry)
    return found


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
