"""download.py end to end on small offline corpora: flags, outputs, manifest, losslessness,
reruns, interruption and the documented hand-over exits."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from palm.cli.download import build_parser, main
from palm.data import TokenWindows, load_manifest, pack
from palm.tokenizer import Tokenizer

TINY = [
    "--max_bytes",
    "150000",
    "--vocab_size",
    "512",
    "--n_workers",
    "2",
    "--seq_len",
    "32",
    "--batch_size",
    "4",
]


def random_text(n_lines: int, seed: int = 0) -> str:
    """Lines of random words: enough distinct strings for a 300-piece vocabulary."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7)))

    return "".join(
        " ".join(word() for _ in range(rng.randint(1, 30))) + "\n" for _ in range(n_lines)
    )


def run(tmp: Path, *flags: str) -> int:
    return main(["--path", str(tmp), *flags])


@pytest.fixture(scope="module")
def stdlib(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    vocab = root / "vocab.txt"
    assert (
        run(
            root,
            "--dataset",
            "python-stdlib",
            "--split",
            "True",
            "--valid_fraction",
            "0.2",
            "--test_fraction",
            "0.2",
            "--vocab_file",
            str(vocab),
            *TINY,
        )
        == 0
    )
    return root


@pytest.mark.parametrize(
    "word,value",
    [("True", True), ("false", False), ("1", True), ("0", False), ("yes", True), ("no", False)],
)
def test_booleans(word: str, value: bool) -> None:
    args = build_parser().parse_args(["--dataset", "x", "--combine", word])
    assert args.combine is value


@pytest.mark.parametrize(
    "argv",
    [
        ["--dataset", "x", "--combine", "maybe"],
        ["--dataset", "x", "--no_such_flag", "1"],
        ["--dataset", "x", "--download_models", "True", "--tokenize", "False"],
        ["--dataset", "x", "--download_scripts", "yes"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_outputs_and_manifest(stdlib: Path) -> None:
    out = stdlib / "python-stdlib"
    for name in ("tokenizer.model", "meta.json", "train.bin", "validation.bin", "test.bin"):
        assert (out / name).exists()
    m = load_manifest(out)
    tokenizer = Tokenizer.load(out / "tokenizer.model")
    assert (m.vocab_size, m.dtype, m.eod_id, m.pad_id) == (512, "uint16", 1, 0)
    assert m.tokenizer_sha256 == tokenizer.sha256 and (m.seq_len, m.batch_size) == (32, 4)
    assert m.corpus["python_version"] and set(m.splits) == {"train", "validation", "test"}
    lines = (stdlib / "vocab.txt").read_text().split("\n")[:-1]
    assert len(lines) == 512 and lines[1] == "<eod>"
    for info in m.splits.values():
        data = (out / info["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"]
        assert len(data) == 2 * info["n_tokens"]


def test_pipeline_is_lossless(stdlib: Path) -> None:
    """Decoding each split, cut at <eod>, gives back exactly the collected documents."""
    out = stdlib / "python-stdlib"
    m, tokenizer = load_manifest(out), Tokenizer.load(out / "tokenizer.model")
    raw = stdlib / "raw" / "python-stdlib" / "python-stdlib.jsonl"
    source = [json.loads(line)["text"] for line in raw.read_text().split("\n")[:-1]]
    decoded = []
    for split in m.splits:
        tokens = np.fromfile(out / f"{split}.bin", dtype=np.uint16).tolist()
        ends = [i for i, t in enumerate(tokens) if t == m.eod_id]
        assert len(ends) == m.splits[split]["n_documents"]
        assert not tokens or tokens[-1] == m.eod_id
        starts = [0] + [e + 1 for e in ends[:-1]]
        decoded += [tokenizer.decode(tokens[s:e]) for s, e in zip(starts, ends)]
    assert sorted(decoded) == sorted(source)


def test_loader_reads_it(stdlib: Path) -> None:
    windows = TokenWindows(stdlib / "python-stdlib", "train", 32, seed=0)
    x, y = windows.batch([0, 1, len(windows)])
    assert x.shape == (3, 32) and (x[:, 1:] == y[:, :-1]).all()
    windows.check_compatible(load_manifest(stdlib / "python-stdlib").tokenizer_sha256, 512)


def test_rerun_skips_and_pretrained_hands_over(stdlib: Path, capsys, monkeypatch) -> None:
    # Offline with an empty Hugging Face cache: the weights step fails with one clear line
    # (tests/test_pretrained.py serves real ones from a local hub).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(stdlib / "empty-hf-cache"))
    before = (stdlib / "python-stdlib" / "train.bin").stat().st_mtime_ns
    code = run(
        stdlib,
        "--dataset",
        "python-stdlib",
        "--split",
        "True",
        "--valid_fraction",
        "0.2",
        "--test_fraction",
        "0.2",
        "--download_pretrained",
        "True",
        *TINY,
    )
    captured = capsys.readouterr()
    assert code == 1 and "HF_HUB_OFFLINE=1" in captured.err
    assert captured.out.count("skipping") == 3  # collection, tokenizer, token files
    assert (stdlib / "python-stdlib" / "train.bin").stat().st_mtime_ns == before


def test_padded_layout_and_official_splits(tmp_path: Path) -> None:
    corpus = tmp_path / "mini"
    corpus.mkdir()
    text = random_text(400)
    (corpus / "train.txt").write_text(text)
    (corpus / "valid.txt").write_text(text[:2000])
    assert (
        run(
            tmp_path,
            "--dataset",
            str(corpus),
            "--combine",
            "False",
            "--vocab_size",
            "300",
            "--seq_len",
            "16",
            "--documents",
            "line",
        )
        == 0
    )
    m = load_manifest(tmp_path / "mini")
    assert m.layout == "padded" and set(m.splits) == {"train", "validation"}
    assert m.splits["train"]["n_documents"] == 400
    x, y = TokenWindows(tmp_path / "mini", "train", 16, seed=1).batch(range(8))
    assert (y == -100).any() and (x[:, 0] != 0).all()  # each row starts a document or goes on
    assert run(tmp_path, "--dataset", str(corpus), "--split", "True") == 1  # official splits


def test_interrupted_run_leaves_nothing_finished(tmp_path: Path, monkeypatch, capsys) -> None:
    source = tmp_path / "c.txt"
    source.write_text(random_text(300))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pack.SplitWriter, "finish", interrupted)
    assert run(tmp_path, "--dataset", str(source), "--vocab_size", "300") == 130
    out = tmp_path / "c"
    assert not (out / "meta.json").exists() and not (out / "train.bin").exists()
    assert not list(out.glob(".*tmp*"))
    monkeypatch.undo()
    assert run(tmp_path, "--dataset", str(source), "--vocab_size", "300") == 0
    assert "tokenizer.model exists" in capsys.readouterr().out


def test_wikitext_by_hand_offline(tmp_path: Path, capsys) -> None:
    assert run(tmp_path, "--dataset", "wikitext-2-v1", "--download_data", "False") == 1
    err = capsys.readouterr().err
    assert "raw/wikitext-2-v1/wikitext-2/wiki.train.tokens" in err and "wikitext-2-v1.zip" in err
    folder = tmp_path / "raw" / "wikitext-2-v1" / "wikitext-2"
    folder.mkdir(parents=True)
    expected_words = {}
    for split, n in (("train", 60), ("valid", 5), ("test", 5)):
        lines = []
        for i in range(n):
            body = random_text(1, seed=i + 100 * len(split)).strip()
            lines += [" ", f" = Title {i} = ", " ", f" {body} . ", " "]
        (folder / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n")
        # WikiText's count: space-separated words plus one <eos> per line.
        expected_words[split] = sum(len([w for w in line.split(" ") if w]) + 1 for line in lines)
    assert (
        run(
            tmp_path,
            "--dataset",
            "wikitext-2-v1",
            "--download_data",
            "False",
            "--vocab_size",
            "300",
            "--seq_len",
            "8",
        )
        == 0
    )
    m = load_manifest(tmp_path / "wikitext-2-v1")
    assert m.splits["train"]["n_documents"] == 60
    assert m.splits["validation"]["n_words"] == expected_words["valid"]
    assert m.splits["train"]["n_words"] == expected_words["train"]
