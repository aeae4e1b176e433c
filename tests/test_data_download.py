"""The downloader against a local HTTP server on 127.0.0.1: a normal download, a cut connection
resumed with Range, a wrong checksum, a 404 then a working mirror, no server at all, unsafe
archives, and the documented command's flags end to end."""

from __future__ import annotations

import hashlib
import io
import random
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from palm.cli.download import main
from palm.data import load_manifest, sources
from palm.errors import DataError
from palm.fetch import FetchConfig, RemoteFile, fetch, safe_extract

FAST = FetchConfig(retries=3, backoff_s=0.01, timeout_s=5, progress=False)


class Server:
    """Serves `files` under /good/ and /cut/ (first response stops halfway); /missing/ is 404."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.requests = files, []
        self.cut_once: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append(
                    (self.path, self.headers.get("Range"), self.headers.get("User-Agent"))
                )
                _, mode, name = self.path.split("/", 2)
                if mode == "missing" or name not in outer.files:
                    self.send_error(404)
                    return
                data, start = outer.files[name], 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if mode == "cut" and name not in outer.cut_once:
                    outer.cut_once.add(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # drop mid-file
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def remote_for(name: str, data: bytes) -> RemoteFile:
    return RemoteFile(name, len(data), hashlib.sha256(data).hexdigest())


@pytest.fixture
def server():
    payload = bytes(range(256)) * 4096  # 1 MiB: several read chunks
    srv = Server({"blob.bin": payload})
    yield srv, payload
    srv.close()


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
    with pytest.raises(DataError, match=rf"{url}.*place it by hand at .*blob.bin.*--download_data"):
        fetch(RemoteFile("blob.bin", 10, "0" * 64), tmp_path, [url], FAST)


def test_extraction_refuses_escaping_paths(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr("../escape.txt", "bad")
    with pytest.raises(DataError, match="outside"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out").exists()


def test_documented_command_against_local_mirror(tmp_path: Path, monkeypatch, capsys) -> None:
    """The README's first command, with the archive served from 127.0.0.1 (fixture zip, so its
    published size and checksum are swapped for the fixture's)."""
    article = " = Article {i} = \n \n {body} \n \n"
    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrst") for _ in range(rng.randint(2, 8)))
        for _ in range(3000)
    ]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for split, n in (("train", 40), ("valid", 4), ("test", 4)):
            text = "".join(
                article.format(i=i, body=" ".join(words[i * 60 : i * 60 + 60])) for i in range(n)
            )
            zf.writestr(f"wikitext-2-raw/wiki.{split}.raw", text)
    data = buffer.getvalue()
    monkeypatch.setitem(
        sources.WIKITEXT_FILES, "wikitext-2-raw-v1", remote_for("wikitext-2-raw-v1.zip", data)
    )
    srv = Server({"wikitext-2-raw-v1.zip": data})
    monkeypatch.setenv("PALM_DATA_MIRRORS", f"{srv.url}/missing,{srv.url}/cut")
    # The weights step (tested against a local hub in test_pretrained.py) must not reach the
    # network here: offline with an empty cache it fails cleanly after the data work is done.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    try:
        code = main(
            [
                "--path",
                str(tmp_path),
                "--dataset",
                "wikitext-2",
                "--combine",
                "True",
                "--tokenize",
                "True",
                "--split",
                "False",
                "--process",
                "True",
                "--batch_size",
                "8",
                "--seq_len",
                "16",
                "--vocab_size",
                "400",
                "--vocab_file",
                str(tmp_path / "vocab.txt"),
                "--n_workers",
                "2",
                "--download_data",
                "True",
                "--download_models",
                "False",
                "--download_scripts",
                "False",
                "--download_pretrained",
                "True",
                "--retries",
                "3",
            ]
        )
    finally:
        srv.close()
    err = capsys.readouterr().err
    assert code == 1 and "HF_HUB_OFFLINE" in err and "palm-410m" in err
    m = load_manifest(tmp_path / "wikitext-2")
    assert set(m.splits) == {"train", "validation", "test"} and m.splits["train"]["n_tokens"]
    assert (tmp_path / "raw" / "wikitext-2-raw-v1.zip").exists()
    assert len((tmp_path / "vocab.txt").read_text().split("\n")) == 401
