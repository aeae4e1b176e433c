"""Throughput of the whole training loop against the bare training step (issue 4's figure).

The loop (`palm.trainer.Trainer.fit`) includes data loading from the memmapped token files,
the LR schedule, loss-spike checks, metric logging (JSONL + TensorBoard) and checkpointing. The
bare step is forward, loss, backward, clipping and the optimizer on batches already in memory.
Both run the same model and optimizer in one process, alternated over several rounds; medians.

    python benchmarks/train_loop.py --sizes S,M --rounds 3 --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_token_dataset
from palm.config import load_config
from palm.distributed import clip_gradients
from palm.flops import flops_per_token
from palm.metrics import measure_matmul_peak
from palm.trainer import Trainer

# The model benchmark's reference sizes (issue 2): S and M.
SIZES = {
    "S": dict(vocab=8192, d_model=256, n_layers=4, n_heads=4, head_dim=64, seq_len=256, batch=8),
    "M": dict(vocab=32000, d_model=512, n_layers=8, n_heads=8, head_dim=64, seq_len=512, batch=4),
}


def write_random_dataset(folder: Path, vocab: int, n_tokens: int) -> None:
    """A prepared dataset of random tokens: throughput does not care what they say."""
    rng = np.random.default_rng(0)
    splits = {
        split: (rng.integers(3, vocab, size=n, dtype=np.uint16), 1)
        for split, n in (("train", n_tokens), ("validation", n_tokens // 10))
    }
    write_token_dataset(folder, splits, vocab, 1, 0, 256, 8, name="random")


def bare_steps(trainer: Trainer, steps: int) -> list[float]:
    """Seconds per step of forward/loss/backward/clip/optimizer on in-memory batches."""
    indices = trainer.batch_indices(0)
    x, y = trainer.train_data.batch(indices)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = trainer.train_module(x, targets=y, z_loss_coef=1e-4)
        out.loss.backward()
        clip_gradients(list(trainer.model.parameters()), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def loop_steps(trainer: Trainer, steps: int) -> float:
    """Seconds per step of the real loop over `steps` more steps, from the loop's own clock.

    The trainer times every logged interval (log_every=1 here), so the sum of
    tokens / tokens_per_s over the round covers data loading, the step and logging; fit()'s
    one-off start (resume) and end (final evaluation and checkpoint) stay outside. Checkpoints
    are timed separately (`Trainer.save`) and amortised at the configs' intervals.
    """
    c = trainer.config
    start_step = trainer.state.step
    train = {**c.train.__dict__, "max_steps": start_step + steps}
    trainer.config = type(c)(c.model, c.data, c.optim, type(c.train)(**train))
    trainer.fit()
    metrics = trainer.run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    mine = [r for r in records if r.get("kind") == "train" and r["step"] > start_step]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in _per_step_tokens(mine))
    return seconds / len(mine)


def _per_step_tokens(records: list[dict]) -> list[dict]:
    """Each record with the tokens of its own interval (the logged count is cumulative)."""
    out, previous = [], None
    for r in records:
        tokens = r["tokens"] - previous if previous is not None else r["tokens"] / r["step"]
        out.append({"tokens": tokens, "tokens_per_s": r["tokens_per_s"]})
        previous = r["tokens"]
    return out


def run(size: str, rounds: int, steps: int, threads: int) -> dict:
    s = SIZES[size]
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_random_dataset(data, s["vocab"], 2_000_000)
        config = load_config(
            None,
            [
                f"data.path={data}",
                f"train.runs_dir={tmp}/runs",
                "train.name=bench",
                f"model.d_model={s['d_model']}",
                f"model.n_layers={s['n_layers']}",
                f"model.n_heads={s['n_heads']}",
                f"model.head_dim={s['head_dim']}",
                f"data.seq_len={s['seq_len']}",
                f"data.batch_size={s['batch']}",
                f"data.micro_batch_size={s['batch']}",
                "train.log_every=1",
                "train.eval_every=0",
                "train.checkpoint_every=0",
                "train.keep_checkpoints=2",
                "train.sample_tokens=0",
                "train.spike_detection=true",
                "train.max_steps=1",
                "train.resume=auto",
            ],
        )
        trainer = Trainer(config)
        bare_steps(trainer, 2)  # warm-up
        bare, loop, save = [], [], []
        for _ in range(rounds):
            bare.append(statistics.median(bare_steps(trainer, steps)))
            loop.append(loop_steps(trainer, steps))
            start = time.perf_counter()
            trainer.save()  # model + optimizer + meta, fsynced and renamed
            save.append(time.perf_counter() - start)
        tokens = s["seq_len"] * s["batch"]
        peak = measure_matmul_peak(torch.device("cpu"))
        fpt = flops_per_token(trainer.config.model, s["seq_len"])
        bare_tps, loop_tps = tokens / statistics.median(bare), tokens / statistics.median(loop)
        save_s = statistics.median(save)
        # Checkpointing amortised at the repository configs' intervals (quick start 200 steps,
        # default 500): seconds per step = loop step + save / interval.
        amortised = {
            every: tokens / (statistics.median(loop) + save_s / every) for every in (200, 500)
        }
        return {
            "size": size,
            "threads": threads,
            "rounds": rounds,
            "steps": steps,
            "bare_tokens_per_s": bare_tps,
            "loop_tokens_per_s": loop_tps,
            "loop_over_bare": loop_tps / bare_tps,
            "checkpoint_s": save_s,
            "loop_ckpt200_over_bare": amortised[200] / bare_tps,
            "loop_ckpt500_over_bare": amortised[500] / bare_tps,
            "matmul_peak_flops": peak,
            "bare_mfu": bare_tps * fpt / peak,
            "loop_mfu": loop_tps * fpt / peak,
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="S,M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="steps per round and mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = [run(size, args.rounds, args.steps, args.threads) for size in args.sizes.split(",")]
    print(
        "| size | bare step tokens/s | loop tokens/s (no checkpoint) | loop / bare | "
        "checkpoint (s) | loop / bare, checkpoint every 200 | every 500 | loop MFU |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['size']} | {r['bare_tokens_per_s']:,.0f} | {r['loop_tokens_per_s']:,.0f} | "
            f"{r['loop_over_bare']:.1%} | {r['checkpoint_s']:.2f} | "
            f"{r['loop_ckpt200_over_bare']:.1%} | {r['loop_ckpt500_over_bare']:.1%} | "
            f"{r['loop_mfu']:.1%} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
