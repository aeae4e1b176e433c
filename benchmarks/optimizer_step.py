"""The optimizer step alone (issue 16): PaLM Adafactor, eager (foreach) and compiled (what
train.compile runs), against torch's AdamW (foreach) on the parameters of the S and M models of
benchmarks/train_step.py, with the same random gradients.

Each round times `--steps` optimizer steps after a warm-up and keeps their median; the table
gives the median (min-max) over `--rounds` rounds, and the fp32 matmul peak measured in the same
run (machines differ: compare ratios within one run).

    python benchmarks/optimizer_step.py --sizes S,M --rounds 5 --steps 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import matmul_peak_flops, median
from benchmarks.train_step import SIZES, palm_config
from palm.model import PaLM
from palm.optim import build_optimizer

OPTIMIZERS = {
    "PaLM Adafactor": lambda params: build_optimizer("adafactor", params),
    # train.compile's update: one torch.compile'd function (compiled in the untimed warm-up)
    "PaLM Adafactor (compiled)": lambda params: build_optimizer("adafactor", params, compiled=True),
    "AdamW (foreach)": lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=True),
}


def time_steps(name: str, size: dict, steps: int, warmup: int = 3) -> float:
    torch.manual_seed(0)
    model = PaLM(palm_config(size))
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = OPTIMIZERS[name](params)
    times = []
    for i in range(warmup + steps):
        began = time.perf_counter()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - began)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="S,M")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    peak = matmul_peak_flops() / 1e9
    print(f"fp32 matmul peak: {peak:.0f} GFLOP/s, {torch.get_num_threads()} threads")
    print("| size | parameters | optimizer | step ms, median (min-max) | vs AdamW |")
    print("|---|---|---|---|---|")
    for size_name in args.sizes.split(","):
        size = SIZES[size_name]
        n = sum(p.numel() for p in PaLM(palm_config(size)).parameters())
        rounds = {name: [] for name in OPTIMIZERS}
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            for name in OPTIMIZERS:
                rounds[name].append(time_steps(name, size, args.steps) * 1e3)
        adamw = median(rounds["AdamW (foreach)"])
        for name, ms in rounds.items():
            print(
                f"| {size_name} | {n / 1e6:.1f}M | {name} | {median(ms):.2f} "
                f"({min(ms):.2f}-{max(ms):.2f}) | {median(ms) / adamw:.2f}x |"
            )


if __name__ == "__main__":
    main()
