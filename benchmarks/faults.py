"""Fault injection against real training runs: how a run survives kill -9, damaged checkpoints,
a full disk and SIGTERM under torchrun (issue 12).

    python benchmarks/faults.py                 # 20 random SIGKILLs + every other scenario
    python benchmarks/faults.py --kills 4 --prune-kills 2 --json out.json   # the slow test's

Each scenario runs `train.py` on a tiny model and a synthetic dataset in a temporary folder, as a
user would, and inspects the checkpoint folder between runs:
- kills: SIGKILL at random moments of a run that checkpoints every step (keeping 3), restarted
  each time; after every kill, count `step_*` folders that are not complete (must be 0); at the
  end, temporary/trash folders left after the final restart (must be 0) and that it finishes.
- prune-kills: the same with keep_checkpoints=1, so that most kills land in a prune.
- flipped byte / truncated optimizer / deleted meta.json in the newest checkpoint: the restart
  falls back to an older checkpoint, says so, and finishes.
- disk full: ENOSPC injected into a save (in process): one `error:` line, older checkpoints intact,
  no debris, and the rerun resumes.
- torchrun: SIGTERM to a 2-rank DDP run (gloo): exits 0 with a checkpoint of the last step, and a
  2-rank restart finishes.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_token_dataset
from palm.checkpoint import FILES, PREFIX, list_checkpoints

TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.head_dim=16",
    "data.micro_batch_size=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.sample_tokens=0",
    "optim.lr=0.01",
]


def write_dataset(folder: Path, vocab: int = 64, n_tokens: int = 20_000) -> Path:
    """A prepared dataset of counting runs (a loss that goes down), no tokenizer needed."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", n_tokens), ("validation", n_tokens // 5)):
        starts = rng.integers(1, vocab, size=n // 8 + 1)
        tokens = ((starts[:, None] + np.arange(8)[None, :]) % (vocab - 1) + 1).reshape(-1)[:n]
        splits[split] = (tokens, n // 8)
    return write_token_dataset(folder, splits, vocab, 0, vocab - 1, 16, 8)


def train_args(data: Path, runs: Path, *extra: str) -> list[str]:
    return [f"data.path={data}", f"train.runs_dir={runs}", "train.name=t", *TINY, *extra]


def start(args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = (launcher or [sys.executable]) + [str(ROOT / "train.py"), *args]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    process = start(args)
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def incomplete(root: Path) -> int:
    """`step_*` folders that are not complete (a file missing): must never exist after a kill."""
    if not root.is_dir():
        return 0
    folders = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    folders = [p for p in folders if p.name[len(PREFIX) :].isdigit()]
    return sum(not all((p / f).is_file() for f in FILES) for p in folders)


def leftovers(root: Path) -> int:
    return sum(1 for p in root.iterdir() if ".tmp-" in p.name or ".trash-" in p.name)


def wait_for_steps(metrics: Path, n_lines: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= n_lines:
            return
        time.sleep(0.01)
    raise TimeoutError(f"{metrics}: {n_lines} lines not reached")


def kills(work: Path, n: int, keep: int, seed: int) -> dict:
    """n SIGKILLs at random moments, each followed by a restart; then a run to the end."""
    data, runs = write_dataset(work / "data"), work / "runs"
    root, metrics = runs / "t" / "checkpoints", runs / "t" / "metrics.jsonl"
    args = train_args(
        data, runs, "train.checkpoint_every=1", f"train.keep_checkpoints={keep}",
        "train.max_steps=100000",
    )  # fmt: skip
    rng = random.Random(seed)
    figures = {"kills": n, "restarts_resumed": 0, "incomplete_after_kill": [], "leftovers": []}
    # restarts_resumed counts restarts 2..n that continued a checkpoint (the first run is new)
    for trial in range(n):
        before = metrics.read_text().count("\n") if metrics.exists() else 0
        process = start(args)
        wait_for_steps(metrics, before + 2)  # training (and checkpointing) under way
        time.sleep(rng.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        out, _ = process.communicate(timeout=60)
        figures["restarts_resumed"] += trial > 0 and "resumed from" in out
        figures["incomplete_after_kill"].append(incomplete(root))
        figures["leftovers"].append(leftovers(root))
    last = list_checkpoints(root)
    final = run(train_args(data, runs, "train.checkpoint_every=1", f"train.keep_checkpoints={keep}",
                           f"train.max_steps={int(last[-1].name[len(PREFIX):]) + 3}"))  # fmt: skip
    figures["final_exit"] = final.returncode
    figures["final_resumed"] = "resumed from" in final.stdout
    figures["stale_after_final"] = leftovers(root)
    figures["incomplete_after_final"] = incomplete(root)
    figures["removed_line"] = next(
        (line for line in final.stdout.splitlines() if line.startswith("removed ")), ""
    )
    return figures


def damaged(work: Path, how: str) -> dict:
    """Damage the newest checkpoint of a finished run; the next run must fall back."""
    data, runs = write_dataset(work / "data"), work / "runs"
    first = run(train_args(data, runs, "train.checkpoint_every=2", "train.max_steps=6"))
    assert first.returncode == 0, first.stderr
    root = runs / "t" / "checkpoints"
    newest = list_checkpoints(root)[-1]
    if how == "flipped byte":
        path = newest / "model.safetensors"
        blob = bytearray(path.read_bytes())
        blob[-7] ^= 0x04
        path.write_bytes(bytes(blob))
    elif how == "truncated optimizer":
        path = newest / "optimizer.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "deleted meta.json":
        (newest / "meta.json").unlink()
    again = run(train_args(data, runs, "train.checkpoint_every=2", "train.max_steps=8"))
    resumed = next((line for line in again.stdout.splitlines() if "resumed from" in line), "")
    warning = next((line for line in again.stderr.splitlines() if "warning:" in line), "")
    return {
        "exit": again.returncode,
        "resumed_from": resumed.split("resumed from ")[-1].split("/")[-1] if resumed else "",
        "warning": warning[:160],
        "damaged_kept": any(p.name.startswith(newest.name + ".") for p in root.iterdir()),
    }


def disk_full(work: Path) -> dict:
    """ENOSPC from the third checkpoint write on (in process, with the real trainer)."""
    import palm.checkpoint as checkpoint
    from palm.config import load_config
    from palm.errors import CheckpointError
    from palm.trainer import train

    data, runs = write_dataset(work / "data"), work / "runs"
    real, calls = checkpoint.save_file, [0]

    def filling(*args, **kwargs):
        calls[0] += 1
        if calls[0] > 4:  # two checkpoints (model + optimizer each) fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    args = train_args(data, runs, "train.checkpoint_every=1", "train.max_steps=6")
    config = load_config(None, args)
    checkpoint.save_file = filling
    try:
        train(config)
        message = "no error"
    except CheckpointError as error:
        message = str(error)
    finally:
        checkpoint.save_file = real
    root = runs / "t" / "checkpoints"
    intact = [p.name for p in list_checkpoints(root)]
    resumed = run(args)
    return {
        "error": message[:120],
        "checkpoints_intact": intact,
        "debris": leftovers(root) + incomplete(root),
        "rerun_exit": resumed.returncode,
        "rerun_resumed": "resumed from" in resumed.stdout,
    }


def torchrun_sigterm(work: Path) -> dict:
    """SIGTERM to torchrun with 2 DDP ranks on the CPU: a clean stop, then a 2-rank resume."""
    data, runs = write_dataset(work / "data"), work / "runs"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_port", str(29500 + os.getpid() % 1000)]  # fmt: skip
    extra = ("train.parallel=ddp", "train.checkpoint_every=0", "train.max_steps=100000")
    process = start(train_args(data, runs, *extra), launcher)
    metrics = runs / "t" / "metrics.jsonl"
    wait_for_steps(metrics, 3, timeout=240)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=240)
    root = runs / "t" / "checkpoints"
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    saved = int(list_checkpoints(root)[-1].name[len(PREFIX) :]) if list_checkpoints(root) else -1
    again = start(train_args(data, runs, "train.parallel=ddp", f"train.max_steps={saved + 2}"),
                  launcher)  # fmt: skip
    out2, err2 = again.communicate(timeout=240)
    return {
        # torchrun's own agent answers SIGTERM with SignalException (exit 1) after forwarding it
        # to the workers; what matters is that the workers stop cleanly and checkpoint.
        "torchrun_exit": process.returncode,
        "stopped_by_signal": "(signal)" in out,
        "checkpoint_of_last_step": saved == last_logged,
        "resume_exit": again.returncode,
        "resumed": "resumed from" in out2,
    }


def verify_cost(work: Path, preset: str, rounds: int = 5) -> dict:
    """What checking the sha256s adds to restoring a checkpoint (model + Adafactor state): the
    restore without it (read both files, copy every tensor into place) against the check alone,
    with the files in the page cache (warm) and, where the OS lets us drop it, cold."""
    import statistics

    import torch

    import palm.checkpoint as checkpoint
    from palm.config import Config, ModelConfig
    from palm.distributed import full_state_dicts, load_full_state_dicts
    from palm.model import PaLM
    from palm.optim import build_optimizer

    config = ModelConfig.preset(preset)
    model = PaLM(config)
    optimizer = build_optimizer("adafactor", model.parameters())
    tokens = torch.randint(0, config.vocab_size, (1, 8))
    model(tokens, targets=tokens).loss.backward()
    optimizer.step()
    model_state, optimizer_state = full_state_dicts(model, optimizer)
    meta = Config(model=config).to_dict()
    path = checkpoint.save_checkpoint(
        work, model_state, optimizer_state, checkpoint.TrainingState(step=1), meta
    )
    size = sum((path / f).stat().st_size for f in checkpoint.TENSOR_FILES)

    def restore() -> None:
        loaded = checkpoint.load_checkpoint(path, verify=False)
        load_full_state_dicts(model, optimizer, loaded.model_state, loaded.optimizer_state)

    def restore_verified() -> None:  # what Trainer.load does: hashing while restoring
        with checkpoint.verifying(path):
            restore()

    def drop_caches() -> bool:
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return True
        except OSError:
            return False

    out = {"preset": preset, "tensor_mb": round(size / 1e6)}
    for cache in ("warm", "cold"):
        plain, verified = [], []
        for _ in range(rounds):
            for fn, times in ((restore, plain), (restore_verified, verified)):
                if cache == "cold" and not drop_caches():
                    break
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        if len(verified) < rounds:
            out[cache] = "the page cache cannot be dropped here"
            continue
        added = [v - p for v, p in zip(verified, plain)]
        out[cache] = {
            "restore_s": round(statistics.median(plain), 3),
            "verified_restore_s": round(statistics.median(verified), 3),
            "added_by_verification": f"{statistics.median(added) / statistics.median(plain):.0%} "
            f"(median of {rounds} rounds; per round {min(added):+.3f} to {max(added):+.3f} s)",
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--prune-kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-torchrun", action="store_true")
    parser.add_argument("--verify-preset", default="palm-m", help="model whose load is timed")
    parser.add_argument("--json", type=Path, help="write all figures here")
    args = parser.parse_args()
    results: dict = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results["kills"] = kills(work / "kills", args.kills, keep=3, seed=args.seed)
        results["prune_kills"] = kills(work / "prune", args.prune_kills, keep=1, seed=args.seed + 1)
        for how in ("flipped byte", "truncated optimizer", "deleted meta.json"):
            results[how] = damaged(work / how.replace(" ", "_"), how)
        results["disk full"] = disk_full(work / "disk_full")
        if not args.skip_torchrun:
            results["torchrun sigterm"] = torchrun_sigterm(work / "torchrun")
        if args.verify_preset:
            results["verify cost"] = verify_cost(work / "verify", args.verify_preset)
    results["seconds"] = round(time.perf_counter() - started, 1)
    for name, figures in results.items():
        print(f"{name}: {figures}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
