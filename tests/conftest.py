"""Shared test fixtures, and a test-wide guard: no network except the loopback interface
(127.0.0.1, ::1, localhost).

Datasets: `make_dataset` writes a prepared dataset folder by hand (download.py's format, exact
known tokens), `dataset` is the synthetic one the trainer tests learn from, `prepare_dataset`
runs the real data pipeline (download.py, SentencePiece) on a local corpus (`make_corpus`, words
from `corpus_words`). Models and runs: `tiny_model_config`, `tiny_config` (a whole training
config), `write_run` (a run folder of checkpoints as the trainer writes them), `final_weights`.
Factories are session-scoped fixtures, so module-scoped fixtures can use them too.
"""

from __future__ import annotations

import ipaddress
import random
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

# palm is imported inside the helpers: a module of palm that fails to import then fails only the
# tests that use it, not the collection of the whole suite.
if TYPE_CHECKING:
    from palm.config import Config, ModelConfig

_real_connect = socket.socket.connect
_real_getaddrinfo = socket.getaddrinfo


def _is_local(host: object) -> bool:
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    def getaddrinfo(host, *args, **kwargs):
        if not _is_local(host):
            raise OSError(f"tests may not resolve {host!r}: only 127.0.0.1 is allowed")
        return _real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            raise OSError(f"tests may not connect to {address!r}: only 127.0.0.1 is allowed")
        return _real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)


# ---------------------------------------------------------------------------------------------
# Threads


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models on a shared machine: one intra-op thread is ~50x faster than spinning up
    several on busy cores. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Datasets written by hand

SYNTHETIC_VOCAB = 64


def _write_dataset(
    folder: Path,
    tokens: np.ndarray | None = None,
    *,
    layout: str = "combined",
    seq_len: int | None = None,
    vocab_size: int | None = None,
    pad_id: int | None = None,
    n_tokens: int = 6000,
    seed: int = 0,
) -> Path:
    """A prepared dataset folder in download.py's format (`<split>.bin` + meta.json), uint16.

    Without `tokens`: the synthetic dataset, with learnable structure (runs of counting, seeded):
    train (`n_tokens`) and validation (`n_tokens // 5`) splits; vocab 64, eod 0, pad vocab - 1,
    seq_len 16, batch_size 8. With `tokens`: a train split holding exactly those tokens; vocab
    60000, eod 1, pad 0, seq_len 8, batch_size 4, tokenizer sha256 "ab" * 32. `layout`, `seq_len`,
    `vocab_size` and `pad_id` override either default.
    """
    from palm.data.manifest import Manifest

    if tokens is None:
        vocab = SYNTHETIC_VOCAB if vocab_size is None else vocab_size
        rng = np.random.default_rng(seed)
        splits = {}
        for split, n in (("train", n_tokens), ("validation", n_tokens // 5)):
            starts = rng.integers(1, vocab, size=n // 8 + 1)
            counting = ((starts[:, None] + np.arange(8)[None, :]) % (vocab - 1) + 1).reshape(-1)
            splits[split] = (counting[:n], {"n_documents": n // 8, "sha256": ""})
        defaults = dict(
            dataset="synthetic",
            eod_id=0,
            pad_id=vocab - 1,
            seq_len=16,
            batch_size=8,
            tokenizer_sha256="",
        )
    else:
        vocab = 60000 if vocab_size is None else vocab_size
        splits = {"train": (np.asarray(tokens), {})}
        defaults = dict(
            dataset="hand",
            eod_id=1,
            pad_id=0,
            seq_len=8,
            batch_size=4,
            tokenizer_sha256="ab" * 32,
        )
    if seq_len is not None:
        defaults["seq_len"] = seq_len
    if pad_id is not None:
        defaults["pad_id"] = pad_id
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for split, (split_tokens, extra) in splits.items():
        split_tokens.astype(np.uint16).tofile(folder / f"{split}.bin")
        entries[split] = {"path": f"{split}.bin", "n_tokens": int(split_tokens.size), **extra}
    manifest = Manifest(vocab_size=vocab, dtype="uint16", layout=layout, splits=entries, **defaults)
    (folder / "meta.json").write_text(manifest.to_json())
    return folder


@pytest.fixture(scope="session")
def make_dataset():
    """`make_dataset(folder, tokens=None, *, layout, seq_len, vocab_size, pad_id, n_tokens, seed)`:
    a dataset folder written by hand; see `_write_dataset`."""
    return _write_dataset


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """The synthetic (counting) dataset, in this test's tmp_path."""
    return _write_dataset(tmp_path / "data" / "synthetic")


# ---------------------------------------------------------------------------------------------
# Training configs and runs


def _tiny_config(dataset: Path, runs: Path, *extra: str) -> Config:
    from palm.config import load_config

    return load_config(
        None,
        [
            f"data.path={dataset}",
            f"train.runs_dir={runs}",
            "train.name=t",
            "model.d_model=32",
            "model.n_layers=2",
            "model.n_heads=2",
            "model.head_dim=16",
            "data.micro_batch_size=4",
            "train.log_every=1",
            "train.eval_every=4",
            "train.eval_batches=2",
            "train.checkpoint_every=4",
            "train.sample_tokens=0",
            "train.max_steps=8",
            "optim.lr=0.01",
            *extra,
        ],
    )


@pytest.fixture(scope="session")
def tiny_config():
    """`tiny_config(dataset, runs, *overrides)`: a whole training Config (8 steps of a tiny
    model, run "t" under `runs`), `overrides` as on train.py's command line."""
    return _tiny_config


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from palm.checkpoint import list_checkpoints

    return load_file(list_checkpoints(run_dir / "checkpoints")[-1] / "model.safetensors")


@pytest.fixture(scope="session")
def final_weights():
    """`final_weights(run_dir)`: the state dict of the run's last checkpoint."""
    return _final_weights


def _tiny_model_config(vocab_size: int, max_seq_len: int = 320) -> ModelConfig:
    from palm.config import ModelConfig

    return ModelConfig(
        vocab_size=vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=2,
        head_dim=16,
        max_seq_len=max_seq_len,
    )


@pytest.fixture(scope="session")
def tiny_model_config():
    """`tiny_model_config(vocab_size, max_seq_len=320)`: a 2-layer, d_model 32 ModelConfig."""
    return _tiny_model_config


def _write_run(root: Path, dataset: Path, val_losses=(2.0, 1.5, None), seed: int = 0) -> Path:
    """runs/t/ with one checkpoint per val_loss (steps 100, 200, ...), weights differing."""
    from palm.checkpoint import TrainingState, save_checkpoint
    from palm.config import Config, DataConfig
    from palm.model import PaLM
    from palm.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(dataset / "tokenizer.model")
    config = Config(
        model=_tiny_model_config(tokenizer.vocab_size), data=DataConfig(path=str(dataset))
    )
    run = root / "runs" / "t"
    run.mkdir(parents=True, exist_ok=True)
    shutil.copy(dataset / "tokenizer.model", run / "tokenizer.model")
    for index, loss in enumerate(val_losses):
        torch.manual_seed(seed + index)
        model = PaLM(config.model)
        save_checkpoint(
            run / "checkpoints",
            model.state_dict(),
            {"state": {}, "param_groups": []},
            TrainingState(step=100 * (index + 1), val_loss=loss),
            config.to_dict(),
        )
    return run


@pytest.fixture(scope="session")
def write_run():
    """`write_run(root, dataset, val_losses=(2.0, 1.5, None), seed=0)`: a run folder holding
    checkpoints of a tiny PaLM (for a `prepare_dataset` dataset), written by palm.checkpoint
    exactly as the trainer writes them."""
    return _write_run


# ---------------------------------------------------------------------------------------------
# A real prepared dataset: download.py on a local text corpus

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "one",
    "all",
    "we",
    "their",
    "has",
    "been",
    "would",
    "if",
    "more",
    "when",
    "will",
    "no",
    "who",
    "so",
    "can",
    "said",
    "what",
    "out",
    "up",
    "into",
    "them",
    "some",
    "could",
    "its",
    "than",
    "other",
    "time",
    "only",
    "new",
    "these",
    "two",
    "may",
    "first",
    "then",
    "do",
    "any",
    "like",
    "my",
    "now",
    "over",
    "such",
    "our",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "make",
    "world",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "get",
    "here",
    "between",
    "both",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
]


def _write_corpus(folder: Path, seed: int = 0) -> Path:
    """train/validation/test .txt files of blank-line separated paragraphs (documents)."""
    rng = random.Random(seed)

    def paragraph() -> str:
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(20, 80)))
        return f"{words.capitalize()}.\nSecond line of 12 items, {rng.randint(0, 999)}.\n"

    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 200), ("validation", 20), ("test", 20)):
        (folder / f"{split}.txt").write_text("\n".join(paragraph() for _ in range(n)))
    return folder


@pytest.fixture(scope="session")
def corpus_words() -> list[str]:
    """The corpus vocabulary: 150 common English words."""
    return list(_WORDS)


@pytest.fixture(scope="session")
def make_corpus():
    """`make_corpus(folder, seed=0)`: train/validation/test .txt files of paragraphs."""
    return _write_corpus


def _prepare_dataset(root: Path) -> Path:
    """The real data pipeline (download.py) on the local corpus; returns the dataset folder."""
    from palm.cli.download import main

    corpus = _write_corpus(root / "corpus")
    rc = main(
        [
            "--path",
            str(root / "data"),
            "--dataset",
            str(corpus),
            "--vocab_size",
            "400",
            "--documents",
            "paragraph",
            "--seq_len",
            "32",
            "--batch_size",
            "8",
            "--n_workers",
            "1",
            "--download_data",
            "False",
        ]
    )
    assert rc == 0
    return root / "data" / "corpus"


@pytest.fixture(scope="session")
def prepare_dataset():
    """`prepare_dataset(root)`: download.py (vocab 400, seq_len 32) on `make_corpus(root /
    "corpus")`; returns the dataset folder root/data/corpus (with its tokenizer.model)."""
    return _prepare_dataset


# ---------------------------------------------------------------------------------------------
# A static HTTP server on 127.0.0.1 (downloads are tested against it, never the internet)
# ---------------------------------------------------------------------------------------------


class FileServer:
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


@pytest.fixture
def serve_files():
    """`serve_files({name: bytes})` -> a running FileServer (closed after the test): GET
    /good/NAME serves it (with Range), /cut/NAME drops the first response halfway, /missing/
    is 404. Names may contain slashes (a prepared dataset: "corpus/train.bin")."""
    servers = []

    def start(files: dict[str, bytes]) -> FileServer:
        servers.append(FileServer(files))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def weight_copies_made(monkeypatch) -> list:
    """Every set of decoding weight copies (palm.kv_cache: transposed or packed) made from now
    on, in order: for tests that a session makes one set, not one per request."""
    import palm.kv_cache

    made = []

    def counted(real):
        def make(model, *args, **kwargs):
            made.append(real(model, *args, **kwargs))
            return made[-1]

        return make

    for name in ("transposed_weights", "packed_weights"):
        monkeypatch.setattr(palm.kv_cache, name, counted(getattr(palm.kv_cache, name)))
    return made
