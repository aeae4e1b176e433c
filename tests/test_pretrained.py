"""Pretrained weights: conceptofmind's checkpoint format, made here with the peer itself
(palm-rlhf-pytorch==0.2.1) with random weights, served from 127.0.0.1 like the Hugging Face hub,
fetched by the documented data command, converted, and checked against the peer's logits."""

from __future__ import annotations

import hashlib
import io
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from palm import pretrained
from palm.cli.download import main as download_main
from palm.cli.export import main as export_main
from palm.errors import PretrainedError
from palm.hub import HubFile, git_blob_sha1
from palm.interop import convert_state_dict, from_palm_rlhf_pytorch
from palm.pretrained import Pretrained
from palm.runs import load_model
from palm.tokenizer import Tokenizer

peer_lib = pytest.importorskip("palm_rlhf_pytorch", reason="pip install palm-rlhf-pytorch==0.2.1")
tokenizers = pytest.importorskip("tokenizers")

SHAPE = {"num_tokens": 320, "dim": 64, "depth": 2, "dim_head": 16, "heads": 4}
SPEC = Pretrained(
    HubFile("conceptofmind/palm-410m", "palm_410m_8k_v0.pt"),
    d_model=64,
    n_layers=2,
    n_heads=4,
    head_dim=16,
    vocab_size=320,
    max_seq_len=128,
)
COMMIT = "a" * 40


def make_peer(seed: int = 0, train_final_norm: bool = True):
    """A palm_rlhf_pytorch.PaLM with random weights everywhere (gains too, as after training)."""
    torch.manual_seed(seed)
    peer = peer_lib.PaLM(**SHAPE).eval()
    with torch.no_grad():
        for name, p in peer.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
        if not train_final_norm:  # as palm-rlhf-pytorch <= 0.2.0 left it: never updated
            peer.norm.gamma.fill_(1.0)
    return peer


def tokenizer_json(words: list[str]) -> bytes:
    """A GPT-NeoX-style byte-level BPE tokenizer.json, trained here (eod 0, padding 1)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(words)] * 20, trainer)
    return tok.to_str().encode()


def save_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class Hub:
    """Enough of huggingface.co: resolve URLs, LFS redirects with X-Linked-Etag, Range."""

    def __init__(self, weights: bytes, tokenizer: bytes, corrupt: bool = False) -> None:
        sha = hashlib.sha256(weights).hexdigest()
        served = weights[:-1] + bytes([weights[-1] ^ 1]) if corrupt else weights
        lfs = {"/conceptofmind/palm-410m/resolve/main/palm_410m_8k_v0.pt": (sha, served)}
        plain = {"/EleutherAI/gpt-neox-20b/resolve/main/tokenizer.json": tokenizer}
        cdn = {f"/cdn/{sha}": served}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def send_body(self, data: bytes, head_only: bool) -> None:
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("ETag", f'"{git_blob_sha1(data)}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                if not head_only:
                    self.wfile.write(data[start:])

            def answer(self, head_only: bool) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                if self.path in lfs:
                    etag, _ = lfs[self.path]
                    self.send_response(302)
                    self.send_header("Location", f"/cdn/{etag}")
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("X-Linked-Size", str(len(weights)))
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path in plain or self.path in cdn:
                    self.send_body({**plain, **cdn}[self.path], head_only)
                else:
                    self.send_error(404)

            def do_HEAD(self) -> None:
                self.answer(True)

            def do_GET(self) -> None:
                self.answer(False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def assets(corpus_words):
    peer = make_peer()
    return peer, save_bytes(peer.state_dict()), tokenizer_json(corpus_words)


@pytest.fixture
def hub_env(assets, tmp_path, monkeypatch):
    _, weights, tok = assets
    hub = Hub(weights, tok)
    monkeypatch.setitem(pretrained.PRETRAINED, "palm-410m", SPEC)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield hub
    hub.close()


@pytest.fixture(scope="session")
def data_command(make_corpus):
    """`data_command(tmp_path, *extra)`: download.py on a local corpus, models downloaded."""

    def run(tmp_path: Path, *extra: str) -> int:
        corpus = make_corpus(tmp_path / "corpus")
        return download_main(
            [
                "--path",
                str(tmp_path / "data"),
                "--dataset",
                str(corpus),
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
                "--download_models",
                "True",
                *extra,
            ]
        )

    return run


def test_documented_command_gives_the_peers_logits(
    assets, hub_env, tmp_path, monkeypatch, data_command
):
    peer = assets[0]
    assert data_command(tmp_path, "--download_pretrained", "True", "--pretrained", "palm-410m") == 0
    run = tmp_path / "data" / "pretrained" / "palm-410m"
    loaded = load_model(run, device="cpu", dtype=torch.float32)
    c = loaded.model.config
    assert (c.xpos_scale_base, c.max_seq_len, c.final_norm, c.scale_logits) == (
        512,
        128,
        True,
        False,
    )
    tokens = torch.randint(0, SHAPE["num_tokens"], (2, 64))
    with torch.no_grad():
        diff = (loaded.model(tokens) - peer(tokens)).abs().max().item()
    assert diff <= 1e-5
    # The tokenizer layer serves tokenizer.json: in the run folder and in the dataset folder.
    assert loaded.tokenizer is not None and loaded.tokenizer.eod_id == 0
    data_tok = Tokenizer.load(tmp_path / "data" / "corpus" / "tokenizer.model")
    assert data_tok.sha256 == hashlib.sha256(assets[2]).hexdigest() and data_tok.pad_id == 1
    # The Hugging Face cache layout, so huggingface_hub finds these files too.
    repo = tmp_path / "hf" / "hub" / "models--conceptofmind--palm-410m"
    assert (repo / "refs" / "main").read_text() == COMMIT
    assert (repo / "snapshots" / COMMIT / "palm_410m_8k_v0.pt").is_file()
    # Offline, from the cache only: no request reaches the hub.
    before = len(hub_env.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert data_command(tmp_path, "--download_pretrained", "True") == 0
    assert len(hub_env.requests) == before


def test_offline_without_cache_names_the_file(hub_env, tmp_path, monkeypatch, capsys, data_command):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert data_command(tmp_path, "--download_pretrained", "True") == 1
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE=1" in err and "EleutherAI/gpt-neox-20b/tokenizer.json" in err


def test_corrupt_download_is_refused(assets, tmp_path, monkeypatch, capsys, data_command):
    hub = Hub(assets[1], assets[2], corrupt=True)
    try:
        monkeypatch.setitem(pretrained.PRETRAINED, "palm-410m", SPEC)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        assert data_command(tmp_path, "--download_pretrained", "True", "--retries", "1") == 1
    finally:
        hub.close()
    assert "sha256 mismatch" in capsys.readouterr().err
    assert not (tmp_path / "data" / "pretrained").exists()


def test_export_loads_into_the_peer(assets, hub_env, tmp_path, data_command):
    peer = assets[0]
    assert data_command(tmp_path, "--download_pretrained", "True") == 0
    out = tmp_path / "peer.pt"
    assert (
        export_main(
            [
                "--checkpoint",
                str(tmp_path / "data" / "pretrained" / "palm-410m"),
                "--to",
                "palm-rlhf-pytorch",
                str(out),
            ]
        )
        == 0
    )
    fresh, original = peer_lib.PaLM(**SHAPE).eval(), peer_lib.PaLM(**SHAPE).eval()
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
    original.load_state_dict(peer.state_dict())  # fresh too: no rotary tables cached yet
    tokens = torch.randint(0, SHAPE["num_tokens"], (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), original(tokens), atol=0, rtol=0)
    # A plain-RoPE model cannot be expressed in palm-rlhf-pytorch: one clear error.
    assert (
        export_main(
            [
                "--checkpoint",
                str(tmp_path / "data" / "pretrained" / "palm-410m"),
                "--to",
                "palm-pytorch",
                str(tmp_path / "x.pt"),
            ]
        )
        == 1
    )


def test_untrained_final_norm_means_none_was_used(tmp_path):
    peer = make_peer(seed=1, train_final_norm=False)
    path = tmp_path / "old.pt"
    path.write_bytes(save_bytes(peer.state_dict()))
    ours, choices = pretrained.convert_file(path, SPEC)
    assert choices["final_norm"] is False
    peer.norm = torch.nn.Identity()  # palm-rlhf-pytorch <= 0.2.0: logits from the raw stream
    tokens = torch.randint(0, SHAPE["num_tokens"], (2, 50))
    with torch.no_grad():  # un-normalised logits reach ~40: float32 rounding relative to that
        ours_logits, peer_logits = ours(tokens), peer(tokens)
    scale = peer_logits.abs().max().item()
    torch.testing.assert_close(ours_logits, peer_logits, atol=1e-6 * scale, rtol=0)


def test_xpos_cached_decoding_equals_uncached():
    model = from_palm_rlhf_pytorch(make_peer(seed=2).state_dict(), max_seq_len=64).eval()
    tokens = torch.randint(0, SHAPE["num_tokens"], (2, 24))
    cache = model.new_cache(2, 64)
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :10], cache)] + [
            model(tokens[:, i : i + 1], cache) for i in range(10, 24)
        ]
    # Unscaled logits here reach ~30: float32 rounding of other matmul orders, relative to that.
    scale = full.abs().max().item()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5 * scale, rtol=0)


def test_converter_also_takes_palm_pytorch_state_dicts(tmp_path):
    palm_pytorch = pytest.importorskip("palm_pytorch")
    peer = palm_pytorch.PaLM(dim=32, num_tokens=50, depth=2, dim_head=8, heads=2).eval()
    path = tmp_path / "p.pt"
    path.write_bytes(save_bytes(peer.state_dict()))
    ours, choices = pretrained.convert_file(path)
    assert choices["peer"] == "palm_pytorch" and ours.config.xpos_scale_base == 0
    tokens = torch.randint(0, 50, (1, 20))
    with torch.no_grad():
        assert (ours(tokens) - peer(tokens)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="neither a palm_pytorch nor"):
        convert_state_dict({"x": torch.zeros(1)})


def test_hf_tokenizer_backend(assets):
    tok = Tokenizer(assets[2], "tokenizer.json")
    text = "the world and  its people\n\n  said 12 times"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.encode_batch([text, "a"])[0] == ids
    assert (tok.eod_id, tok.pad_id) == (0, 1) and tok.decode([0, *ids]) == text
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(text) == ids and again.sha256 == tok.sha256
    assert len(tok.pieces()) == tok.vocab_size


def test_weights_only_loading_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "obj": threading.Lock}, path)
    with pytest.raises(PretrainedError, match="not a loadable PyTorch state dict"):
        pretrained.load_peer_state_dict(path)
