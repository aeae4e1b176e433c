"""Data-preparation figures on real text, extrapolated to WikiText-103 (issue 3).

    PYTHONPATH=. .venv/bin/python benchmarks/data_prep.py \
        --text ../shared/data/wikitext-2/wiki.train.tokens --n_workers 2

Measures, each phase in a fresh process so its peak memory is its own:
  1. tokenizer training time and peak RSS (SentencePiece, --vocab_size, --model_type),
  2. tokenization + packing throughput (MB/s of UTF-8 text) and peak RSS with --n_workers,
  3. the time to assemble one loader batch (--batch x --seq_len) from the packed file.
Then extrapolates to WikiText-103 train (540 MB): packing time = 540 MB / throughput; tokenizer
training time scales with the text it sees, which download.py caps at --tokenizer_sample_bytes
(64 MB by default), so its estimate is train_time x min(540, 64) MB / measured MB.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

WT103_MB = 540.0
SAMPLE_MB = 64.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def phase_train(
    text_path: str, vocab_size: int, model_type: str, n_workers: int, out: str
) -> tuple[float, float]:
    from palm.tokenizer import TokenizerTrainConfig, train_sentencepiece

    def lines():
        with open(text_path, encoding="utf-8") as handle:
            for line in handle:
                if line.rstrip("\n"):
                    yield line.rstrip("\n")

    started = time.perf_counter()
    model = train_sentencepiece(lines(), TokenizerTrainConfig(vocab_size, model_type, n_workers))
    seconds = time.perf_counter() - started
    Path(out).write_bytes(model)
    return seconds, _peak_mb()


def phase_pack(text_path: str, model: str, n_workers: int, folder: str) -> tuple[float, float]:
    from palm.data.corpus import iter_documents
    from palm.data.pack import PackConfig, pack
    from palm.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(model)
    documents = (("train", d) for d in iter_documents(Path(text_path), "wikitext"))
    started = time.perf_counter()
    pack(documents, ["train"], tokenizer, Path(folder), PackConfig(True, 256, n_workers))
    return time.perf_counter() - started, _peak_mb()


def phase_loader(folder: str, n_tokens: int, seq_len: int, batch: int) -> float:
    import numpy as np

    from palm.data.loader import TokenWindows
    from palm.data.manifest import Manifest

    Path(folder, "meta.json").write_text(
        Manifest(
            dataset="bench",
            vocab_size=65536,
            dtype="uint16",
            eod_id=1,
            pad_id=0,
            seq_len=seq_len,
            batch_size=batch,
            layout="combined",
            splits={"train": {"path": "train.bin", "n_tokens": n_tokens}},
            tokenizer_sha256="",
        ).to_json()
    )
    windows = TokenWindows(folder, "train", seq_len, seed=0)
    windows.batch(np.arange(batch))  # builds the epoch-0 permutation once
    times = []
    for step in range(1, 201):
        started = time.perf_counter()
        windows.batch(np.arange(step * batch, (step + 1) * batch))
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def run(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", default="../shared/data/wikitext-2/wiki.train.tokens")
    p.add_argument("--vocab_size", type=int, default=16384)
    p.add_argument("--model_type", default="unigram", choices=("unigram", "bpe"))
    p.add_argument("--n_workers", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    text_mb = Path(args.text).stat().st_size / 1e6
    with tempfile.TemporaryDirectory() as folder:
        model = str(Path(folder) / "tokenizer.model")
        train_s, train_mb = run(
            phase_train, args.text, args.vocab_size, args.model_type, args.n_workers, model
        )
        pack_s, pack_mb = run(phase_pack, args.text, model, args.n_workers, folder)
        n_tokens = (Path(folder) / "train.bin").stat().st_size // 2
        batch_s = run(phase_loader, folder, n_tokens, args.seq_len, args.batch)
    mbps = text_mb / pack_s
    train_103 = train_s * min(WT103_MB, SAMPLE_MB) / text_mb
    pack_103 = WT103_MB / mbps
    print(
        f"text: {args.text} ({text_mb:.1f} MB), {args.model_type} vocab {args.vocab_size}, "
        f"{args.n_workers} workers"
    )
    print(f"tokenizer training: {train_s:.1f} s, peak RSS {train_mb:.0f} MB")
    print(
        f"tokenize + pack:    {pack_s:.1f} s = {mbps:.1f} MB/s, {n_tokens:,} tokens "
        f"({text_mb * 1e6 / n_tokens:.2f} bytes/token), peak RSS {pack_mb:.0f} MB"
    )
    print(f"loader batch {args.batch}x{args.seq_len}: {batch_s * 1e6:.0f} us (median of 200)")
    print(
        f"WikiText-103 estimate: tokenizer {train_103:.0f} s (on a {SAMPLE_MB:.0f} MB sample) "
        f"+ packing {pack_103:.0f} s = {(train_103 + pack_103) / 60:.1f} min; packing memory "
        "is bounded by its 4 MB batches, training memory by the sample size"
    )


if __name__ == "__main__":
    main()
