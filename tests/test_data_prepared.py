"""palm.data.prepared: `--export_prepared` writes a folder any static host can serve, and
`--download_data True` fetches it instead of building, verified and resumable (issue 13).
Served from 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palm.cli.download import main as download
from palm.data.prepared import INDEX_NAME

FILES = ("meta.json", "tokenizer.model", "train.bin", "validation.bin", "test.bin")


@pytest.fixture(scope="module")
def built(tmp_path_factory, make_corpus):
    """A dataset built here from a local corpus, and its export."""
    root = tmp_path_factory.mktemp("built")
    corpus = make_corpus(root / "corpus")
    argv = ["--path", str(root / "data"), "--dataset", str(corpus), "--vocab_size", "400"]
    argv += ["--documents", "paragraph", "--seq_len", "32", "--n_workers", "1"]
    assert download([*argv, "--export_prepared", str(root / "export")]) == 0
    return root / "data" / "corpus", root / "export"


def served(export: Path, serve_files, damage: dict[str, bytes] | None = None):
    files = {f"{p.parent.name}/{p.name}": p.read_bytes() for p in (export / "corpus").iterdir()}
    files.update(damage or {})
    return serve_files(files)


def fetch_prepared(tmp_path: Path, mirror: str, *extra: str) -> int:
    return download(
        ["--path", str(tmp_path), "--dataset", "corpus", "--download_data", "True"]
        + ["--mirror", mirror, "--retries", "2", *extra]
    )


def test_export_lists_every_file_with_size_and_sha256(built):
    data, export = built
    index = json.loads((export / "corpus" / INDEX_NAME).read_text())
    assert sorted(index["files"]) == sorted(FILES)
    for name, entry in index["files"].items():
        assert (export / "corpus" / name).read_bytes() == (data / name).read_bytes()
        assert entry["size"] == (data / name).stat().st_size


def test_download_reproduces_the_built_dataset_byte_for_byte(built, tmp_path, serve_files, capsys):
    data, export = built
    srv = served(export, serve_files)
    assert fetch_prepared(tmp_path, f"{srv.url}/good") == 0
    for name in FILES:
        assert (tmp_path / "corpus" / name).read_bytes() == (data / name).read_bytes(), name
    out = capsys.readouterr().out
    assert "build steps (--tokenize, --process) were skipped" in out
    assert not (tmp_path / "raw").exists()  # nothing was built
    assert fetch_prepared(tmp_path, f"{srv.url}/good") == 0  # complete and verified: kept
    assert "complete and verified (skipping)" in capsys.readouterr().out


def test_a_cut_connection_resumes(built, tmp_path, serve_files):
    data, export = built
    srv = served(export, serve_files)
    assert fetch_prepared(tmp_path, f"{srv.url}/cut") == 0
    assert (tmp_path / "corpus" / "train.bin").read_bytes() == (data / "train.bin").read_bytes()
    resumed = [r for path, r, _ in srv.requests if path.endswith("train.bin") and r]
    assert resumed, "the second request for train.bin continues with a Range header"


def test_a_corrupted_token_file_is_refused_and_nothing_looks_finished(
    built, tmp_path, serve_files, capsys
):
    data, export = built
    bad = bytearray((data / "train.bin").read_bytes())
    bad[100] ^= 0xFF
    srv = served(export, serve_files, {"corpus/train.bin": bytes(bad)})
    assert fetch_prepared(tmp_path, f"{srv.url}/good") == 1
    assert "sha256 mismatch" in capsys.readouterr().err
    assert not (tmp_path / "corpus" / "meta.json").exists()  # not a finished dataset
    assert not (tmp_path / "corpus" / "train.bin").exists()


def test_a_tampered_manifest_is_refused(built, tmp_path, serve_files, capsys):
    data, export = built
    meta = json.loads((data / "meta.json").read_text())
    meta["vocab_size"] += 1
    srv = served(export, serve_files, {"corpus/meta.json": json.dumps(meta).encode()})
    assert fetch_prepared(tmp_path, f"{srv.url}/good") == 1
    assert "not the one index.json lists" in capsys.readouterr().err


def test_the_flags_do_what_help_says(built, tmp_path, serve_files, capsys):
    data, export = built
    # --download_data True needs somewhere to download from.
    assert (
        download(["--path", str(tmp_path), "--dataset", "corpus", "--download_data", "True"]) == 1
    )
    assert "needs --mirror URL" in capsys.readouterr().err
    # A 404 mirror, then a working one.
    srv = served(export, serve_files)
    mirrors = f"{srv.url}/missing,{srv.url}/good"
    code = download(
        [
            "--path",
            str(tmp_path),
            "--dataset",
            "corpus",
            "--download_data",
            "True",
            "--retries",
            "1",
        ]
        + ["--mirror", f"{srv.url}/missing", "--mirror", f"{srv.url}/good"]
    )
    assert code == 0 and mirrors
    # Re-export what was downloaded: the same artifact again.
    again = tmp_path / "again"
    assert fetch_prepared(tmp_path, f"{srv.url}/good", "--export_prepared", str(again)) == 0
    for name in [*FILES, INDEX_NAME]:
        assert (again / "corpus" / name).read_bytes() == (export / "corpus" / name).read_bytes()
    # --download_scripts True stays an error on the command line.
    with pytest.raises(SystemExit) as exit_:
        download(["--dataset", "corpus", "--download_scripts", "True"])
    assert exit_.value.code == 2
    help_text = capsys.readouterr()
    assert "no scripts to fetch" in help_text.err
