"""Parallel scaling on this machine: N processes under torchrun against one (issues 6, 15).

Each configuration runs `train.py` at the model benchmark's S size on random tokens for a few
steps and reports the median tokens/s of its metrics (first logged steps dropped as warm-up).
The processes share the machine's cores: with C cores, one process uses C threads and N
processes use C/N threads each, so perfect scaling keeps tokens/s constant; the efficiency is
tokens/s(N processes) / tokens/s(1 process). A configuration is PARALLEL[+tpK]:NPROC, e.g.
`none+tp2:2` (tensor parallel alone) or `fsdp+tp2:4` (dp 2 x tp 2).

`--checkpoint_params N` also times one checkpoint of an N-parameter model (weights plus
Adafactor's two moments) on every rank: gathered (the full state on rank 0, one safetensors
writer) against sharded (torch.distributed.checkpoint, every rank its shards).

    python benchmarks/scaling.py --steps 30 --configs ddp:2,fsdp:2,none+tp2:2,fsdp+tp2:4
    python benchmarks/scaling.py --configs "" --checkpoint_params 300000000
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
    data: Path,
    runs: Path,
    name: str,
    nproc: int,
    parallel: str,
    steps: int,
    threads: int,
    tensor_parallel: int = 1,
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
        f"data.micro_batch_size={s['batch'] * tensor_parallel // nproc}",
        f"train.tensor_parallel={tensor_parallel}",
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


CHECKPOINT_WORKER = """
import json, sys, time, torch, torch.distributed as dist
from pathlib import Path
from palm.checkpoint import TrainingState
from palm.config import ModelConfig
from palm.distributed import init_distributed
from palm.model import PaLM
from palm.optim import build_optimizer
from palm.parallel import parallelize
from palm.saving import Checkpointer
d_model, layers, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
world = init_distributed("fsdp", "cpu")
config = ModelConfig(vocab_size=32000, d_model=d_model, n_layers=layers, n_heads=d_model // 128,
                     head_dim=128)
torch.manual_seed(0)
model, _ = parallelize(lambda: PaLM(config), world, torch.device("cpu"), meta_init=True)
optimizer = build_optimizer("adafactor", model.parameters())
tokens = torch.randint(0, 32000, (1, 128))
model(tokens, targets=tokens).loss.backward()
optimizer.step()
times = {}
for layout in ("gathered", "sharded"):
    saver = Checkpointer(out / layout, world, sharded=layout == "sharded", asynchronous=False)
    dist.barrier()
    began = time.perf_counter()
    saver.save(model, optimizer, TrainingState(step=1), {}, keep=1)
    times[layout] = time.perf_counter() - began
gathered = [None] * world.world_size
dist.all_gather_object(gathered, times)
if world.is_main:
    print("TIMES", json.dumps({"parameters": model.num_parameters(), "ranks": gathered}))
world.close()
"""


def checkpoint_times(params: int, nproc: int, threads: int) -> dict:
    """Seconds each rank spends in one gathered and one sharded save of an FSDP model of about
    `params` parameters (d_model 1024 per 128-wide head, as many layers as that needs)."""
    d_model = 1024
    layers = max(1, round((params - 32000 * d_model) / (12 * d_model * d_model * 1.5)))
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(CHECKPOINT_WORKER)
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*launch, f"--nproc_per_node={nproc}", str(script), str(d_model), str(layers)]
        command.append(tmp)
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        return json.loads(out.stdout.split("TIMES", 1)[1].splitlines()[0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--configs", default="ddp:2,fsdp:2,none+tp2:2,fsdp+tp2:4")
    parser.add_argument("--checkpoint_params", type=int, default=0)
    parser.add_argument("--checkpoint_nproc", type=int, default=2)
    args = parser.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_random_dataset(data, SIZES["S"]["vocab"], 2_000_000)
        runs = Path(tmp) / "runs"
        if configs:
            single = run(data, runs, "one", 1, "none", args.steps, args.cores)
            print("| processes | parallel | tensor parallel | threads each | tokens/s | vs 1 |")
            print("|---|---|---|---|---|---|")
            print(f"| 1 | none | 1 | {args.cores} | {single:,.0f} | 100% |")
        for spec in configs:
            mode, nproc = spec.split(":")
            parallel, _, tp = mode.partition("+tp")
            nproc, tp = int(nproc), int(tp or 1)
            threads = max(1, args.cores // nproc)
            rate = run(data, runs, spec.replace(":", "_"), nproc, parallel, args.steps, threads, tp)
            row = f"| {nproc} | {parallel} | {tp} | {threads} | {rate:,.0f} | {rate / single:.0%} |"
            print(row)
    if args.checkpoint_params:
        nproc = args.checkpoint_nproc
        result = checkpoint_times(args.checkpoint_params, nproc, max(1, args.cores // nproc))
        print(f"\ncheckpoint of {result['parameters']:,} parameters (FSDP, {nproc} ranks), s:")
        print("| rank | gathered (rank 0 writes) | sharded (each rank its shards) |")
        print("|---|---|---|")
        for rank, times in enumerate(result["ranks"]):
            print(f"| {rank} | {times['gathered']:.2f} | {times['sharded']:.2f} |")


if __name__ == "__main__":
    main()
