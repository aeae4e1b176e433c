"""Data-parallel scaling on this machine: N processes under torchrun against one (issue 6).

Each configuration runs `train.py` at the model benchmark's S size on random tokens for a few
steps and reports the median tokens/s of its metrics (first logged steps dropped as warm-up).
The processes share the machine's cores: with C cores, one process uses C threads and N
processes use C/N threads each, so perfect scaling keeps tokens/s constant; the efficiency is
tokens/s(N processes) / tokens/s(1 process).

    python benchmarks/scaling.py --nproc 2 --steps 30 --parallel ddp,fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_loop import SIZES, write_random_dataset


def run(
    data: Path, runs: Path, name: str, nproc: int, parallel: str, steps: int, threads: int
) -> float:
    s = SIZES["S"]
    args = [
        f"data.path={data}",
        f"train.runs_dir={runs}",
        f"train.name={name}",
        f"model.d_model={s['d_model']}",
        f"model.n_layers={s['n_layers']}",
        f"model.n_heads={s['n_heads']}",
        f"model.head_dim={s['head_dim']}",
        f"data.seq_len={s['seq_len']}",
        f"data.batch_size={s['batch']}",
        f"data.micro_batch_size={s['batch'] // nproc}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.sample_tokens=0",
        "train.spike_detection=false",
        f"train.parallel={parallel}",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    if nproc == 1 and parallel == "none":
        command = [sys.executable, str(ROOT / "train.py"), *args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(ROOT / "train.py"),
            *args,
        ]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=3600)
    records = [
        json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()
    ]
    rates = [r["tokens_per_s"] for r in records if r.get("kind") == "train"]
    return statistics.median(rates[3:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--parallel", default="ddp,fsdp")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_random_dataset(data, SIZES["S"]["vocab"], 2_000_000)
        runs = Path(tmp) / "runs"
        single = run(data, runs, "one", 1, "none", args.steps, args.cores)
        print("| processes | parallel | threads each | tokens/s | efficiency vs 1 process |")
        print("|---|---|---|---|---|")
        print(f"| 1 | none | {args.cores} | {single:,.0f} | 100% |")
        for parallel in args.parallel.split(","):
            threads = max(1, args.cores // args.nproc)
            rate = run(data, runs, parallel, args.nproc, parallel, args.steps, threads)
            print(f"| {args.nproc} | {parallel} | {threads} | {rate:,.0f} | {rate / single:.0%} |")


if __name__ == "__main__":
    main()
