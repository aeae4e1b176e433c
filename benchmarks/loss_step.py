"""The fused output projection + loss alone (palm.loss.linear_lm_loss, forward and backward),
float32 on 2 CPU threads, at train_step.py's sizes: this tree against another revision's
palm/loss.py (`--against REV`, read with `git show`), and against whole logits + palm.loss.lm_loss.

The contenders are alternated call by call for several rounds (the order flipped each round), so
a slow spell of a shared machine hits all of them; each figure is the median (min-max).

    python benchmarks/loss_step.py --against HEAD~1 --rounds 11
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from benchmarks.common import matmul_peak_flops, median
from benchmarks.train_step import SIZES, THREADS
from palm import loss as this_loss


def loss_module_at(revision: str):
    """palm/loss.py as it was at `revision`, imported as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:palm/loss.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType("loss_at_revision")
    exec(compile(source, f"{revision}:palm/loss.py", "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="S,M")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--against", help="a git revision whose palm/loss.py to time as well")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    contenders = {"this tree": this_loss.linear_lm_loss}
    if args.against:
        contenders[args.against] = loss_module_at(args.against).linear_lm_loss

    def whole_logits(hidden, weight, targets):
        return this_loss.lm_loss(hidden @ weight.t(), targets)

    contenders["whole logits + lm_loss"] = whole_logits
    print(f"fp32 matmul peak (before): {matmul_peak_flops() / 1e9:.1f} GFLOP/s", flush=True)
    rows = []
    for size_name in args.sizes.split(","):
        size = SIZES[size_name]
        tokens, dim, vocab = (
            size["batch_size"] * size["seq_len"],
            size["d_model"],
            size["vocab_size"],
        )
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(tokens, dim, generator=generator).requires_grad_()
        weight = (torch.randn(vocab, dim, generator=generator) * dim**-0.5).requires_grad_()
        targets = torch.randint(0, vocab, (tokens,), generator=generator)
        times = {name: [] for name in contenders}
        for round_ in range(args.rounds + 1):  # the first round warms up, untimed
            order = list(contenders) if round_ % 2 else list(contenders)[::-1]
            for name in order:
                start = time.perf_counter()
                contenders[name](hidden, weight, targets).loss.backward()
                elapsed = time.perf_counter() - start
                hidden.grad = weight.grad = None
                if round_:
                    times[name].append(elapsed)
        for name, values in times.items():
            rows.append(
                f"| {size_name} ({tokens} x {dim}, vocab {vocab}) | {name} | "
                f"{median(values) * 1e3:.1f} ({min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}) |"
            )
    print(f"fp32 matmul peak (after): {matmul_peak_flops() / 1e9:.1f} GFLOP/s\n")
    print("| size | loss | forward + backward, ms median (min-max) |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
