"""palm.files: the one atomic writer. Readers see the old file or the new one, never a part,
even when the writer is killed with SIGKILL mid-write."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from palm import files
from palm.files import atomic_file, sha256_file, write_atomic


def test_write_atomic_writes_text_and_bytes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    write_atomic(path, "héllo")
    assert path.read_bytes() == "héllo".encode()
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, failure):
    path = tmp_path / "a.bin"
    write_atomic(path, b"old")
    with pytest.raises(type(failure)):
        with atomic_file(path) as handle:
            handle.write(b"new, half written")
            raise failure
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_fsync_failure_is_not_published(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    write_atomic(path, b"old")

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files.os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output"):
        write_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_temporary_names_match_the_cleanup_glob(tmp_path):
    temporary = files.temporary_path(tmp_path / "train.bin")
    assert temporary.parent == tmp_path and temporary.match(files.TEMPORARY_GLOB)
    assert not (tmp_path / "train.bin").match(files.TEMPORARY_GLOB)


def test_sha256_file(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


WRITER = """
import sys
from palm.files import write_atomic
path, n = sys.argv[1], 0
while True:
    n += 1
    write_atomic(path, (str(n % 10) * 2_000_000).encode())  # 2 MB of one digit
"""


def test_sigkill_mid_write_leaves_a_whole_file(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"0" * 2_000_000)
    for delay in (0.05, 0.13, 0.31):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
        time.sleep(delay + 0.5)  # past start-up, somewhere inside a write
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        data = path.read_bytes()
        assert len(data) == 2_000_000 and len(set(data)) == 1, "a torn file"
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert all(p.match(files.TEMPORARY_GLOB) for p in leftovers)  # only what cleanup removes
