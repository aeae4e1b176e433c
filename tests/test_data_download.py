"""The downloader against a local HTTP server on 127.0.0.1: a normal download, a cut connection
resumed with Range, a wrong checksum, a 404 then a working mirror, no server at all, unsafe
archives, and the documented command's flags end to end."""

from __future__ import annotations

import hashlib
import io
import random
import socket
import zipfile
from pathlib import Path

import pytest

from palm.cli.download import main
from palm.data import load_manifest, sources
from palm.errors import DataError
from palm.fetch import FetchConfig, RemoteFile, fetch, safe_extract

FAST = FetchConfig(retries=3, backoff_s=0.01, timeout_s=5, progress=False)


def remote_for(name: str, data: bytes) -> RemoteFile:
    return RemoteFile(name, len(data), hashlib.sha256(data).hexdigest())


@pytest.fixture
def server(serve_files):
    payload = bytes(range(256)) * 4096  # 1 MiB: several read chunks
    return serve_files({"blob.bin": payload}), payload


def test_normal_download_sends_user_agent(server, tmp_path: Path) -> None:
    srv, payload = server
    path = fetch(remote_for("blob.bin", payload), tmp_path, [f"{srv.url}/good/blob.bin"], FAST)
    assert path.read_bytes() == payload and not (tmp_path / "blob.bin.part").exists()
    assert "Python-urllib" not in srv.requests[0][2]
    fetch(remote_for("blob.bin", payload), tmp_path, ["http://unused"], FAST)  # verified: skip
    assert len(srv.requests) == 1


def test_cut_connection_resumes_with_range(server, tmp_path: Path) -> None:
    srv, payload = server
    path = fetch(remote_for("blob.bin", payload), tmp_path, [f"{srv.url}/cut/blob.bin"], FAST)
    assert path.read_bytes() == payload
    ranges = [r for _, r, _ in srv.requests]
    assert ranges[0] is None and ranges[-1] == f"bytes={len(payload) // 2}-"


def test_wrong_checksum_deletes_part(server, tmp_path: Path, capsys) -> None:
    srv, payload = server
    bad = RemoteFile("blob.bin", len(payload), "0" * 64)
    with pytest.raises(DataError, match="sha256 mismatch.*place it by hand"):
        fetch(bad, tmp_path, [f"{srv.url}/good/blob.bin"], FAST)
    assert not list(tmp_path.iterdir())
    assert "deleted the partial file" in capsys.readouterr().err


def test_404_then_second_mirror(server, tmp_path: Path) -> None:
    srv, payload = server
    urls = [f"{srv.url}/missing/blob.bin", f"{srv.url}/good/blob.bin"]
    assert fetch(remote_for("blob.bin", payload), tmp_path, urls, FAST).read_bytes() == payload
    assert [p for p, _, _ in srv.requests] == ["/missing/blob.bin", "/good/blob.bin"]


def test_no_server_names_url_and_manual_placement(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x/blob.bin"
    with pytest.raises(DataError, match=rf"{url}.*place it by hand at .*blob.bin.*then rerun"):
        fetch(RemoteFile("blob.bin", 10, "0" * 64), tmp_path, [url], FAST)


def test_extraction_refuses_escaping_paths(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr("../escape.txt", "bad")
    with pytest.raises(DataError, match="outside"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out").exists()


def wikitext_zip(
    inner: str, suffix: str = "raw", words: int = 90_000, lines: int = 14_000
) -> bytes:
    """A WikiText-shaped zip (articles with " = Title = " lines) big enough for the README's
    --vocab_size 50000."""
    rng = random.Random(0)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
        for _ in range(words)
    ]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for split, n in (("train", lines), ("valid", lines // 20), ("test", lines // 20)):
            body = []
            for i in range(n):
                if i % 40 == 0:
                    body += [" ", f" = Article {i} = ", " "]
                body.append(" " + " ".join(rng.choice(vocab) for _ in range(rng.randint(8, 40))))
            zf.writestr(f"{inner}/wiki.{split}.{suffix}", "\n".join(body) + "\n")
    return buffer.getvalue()


def readme_command(prefix: str) -> list[str]:
    """The README's documented command line starting with `prefix`, split into its flags."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith(prefix))
    return line.split()[2:]  # drop "python3 download.py"


def test_documented_command_builds_from_an_empty_folder(tmp_path, monkeypatch, capsys, serve_files):
    """The README's first command, exactly as written, in an empty folder: it builds
    data/wikitext-103 (the raw zip fetched from a mirror on 127.0.0.1, here a fixture with its
    size and checksum swapped in) and only then fails, offline, on the pretrained weights."""
    argv = readme_command("python3 download.py --path data/ --dataset wikitext-103")
    assert "--download_data" in argv and argv[argv.index("--download_data") + 1] == "False"
    data = wikitext_zip("wikitext-103-raw")
    monkeypatch.setitem(
        sources.WIKITEXT_FILES,
        "wikitext-103-raw-v1",
        remote_for("wikitext-103-raw-v1.zip", data),
    )
    srv = serve_files({"wikitext-103-raw-v1.zip": data})
    monkeypatch.setenv("PALM_DATA_MIRRORS", f"{srv.url}/missing,{srv.url}/cut")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the weights step: no network, a clean error
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and "HF_HUB_OFFLINE" in err and "palm-410m" in err
    m = load_manifest(tmp_path / "data" / "wikitext-103")
    assert set(m.splits) == {"train", "validation", "test"} and m.splits["train"]["n_tokens"]
    assert m.vocab_size == 50000 and m.seq_len == 256 and m.batch_size == 256
    assert (tmp_path / "data" / "raw" / "wikitext-103-raw-v1.zip").exists()
    assert len((tmp_path / "data" / "vocab.txt").read_text().split("\n")) == 50001
    ranges = [r for path, r, _ in srv.requests if path.startswith("/cut/")]
    assert ranges[0] is None and ranges[-1] is not None  # the cut download resumed


def test_offline_build_names_where_to_put_the_zip(tmp_path, capsys):
    """No network (tests may only reach 127.0.0.1): the error names the zip and its place."""
    code = main(["--path", str(tmp_path), "--dataset", "wikitext-2", "--retries", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("error:")
    assert "wikitext-2-raw-v1.zip" in err and str(tmp_path / "raw") in err and "rerun" in err
