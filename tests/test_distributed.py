"""Data and tensor parallelism through torchrun on the CPU (gloo): DDP, FSDP2, tensor parallel
and FSDP2 x tensor parallel against one process, and resuming under another mesh."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from palm.checkpoint import list_checkpoints
from palm.config import load_config
from palm.saving import load_checkpoint_weights
from palm.trainer import train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="torch.distributed with gloo is not available in this build",
    ),
]
MODEL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.head_dim=16"]


def args(dataset: Path, runs: Path, name: str, steps: int, *extra: str) -> list[str]:
    return [
        f"data.path={dataset}",
        f"train.runs_dir={runs}",
        f"train.name={name}",
        *MODEL,
        "data.micro_batch_size=2",
        "train.log_every=1",
        "train.eval_every=0",
        "train.sample_tokens=0",
        f"train.max_steps={steps}",
        "train.checkpoint_every=0",
        *extra,
    ]


def torchrun(*arguments: str, nproc: int = 2, extra: tuple[str, ...] = (), wait: bool = True):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *extra,
        str(ROOT / "train.py"),
        *arguments,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> list[float]:
    return [
        json.loads(line)["loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"kind": "train"' in line
    ]


def tokens_seen(run_dir: Path) -> int:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["tokens"] for x in lines if '"kind": "train"' in x][-1]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint_weights(list_checkpoints(run_dir / "checkpoints")[-1])  # any layout


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_dataset):
    root = tmp_path_factory.mktemp("dist")
    dataset = make_dataset(root / "data" / "synthetic")
    runs = root / "runs"
    one = train(load_config(None, args(dataset, runs, "one", 5))).run_dir
    return dataset, runs, one


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_give_the_same_losses_and_weights_as_one_process(setup, parallel):
    dataset, runs, one = setup
    output = torchrun(*args(dataset, runs, parallel, 5, f"train.parallel={parallel}")).stdout
    assert output.count("finished at step 5") == 1  # rank 0 alone prints
    torch.testing.assert_close(losses(runs / parallel), losses(one), rtol=1e-5, atol=1e-6)
    assert_same_weights(runs / parallel, one)
    assert tokens_seen(runs / parallel) == tokens_seen(one) == 5 * 8 * 16  # global, not per rank


@pytest.mark.parametrize("parallel,first,second", [("ddp", 2, 1), ("fsdp", 1, 2), ("fsdp", 2, 1)])
def test_resume_with_another_number_of_ranks(setup, parallel, first, second):
    dataset, runs, one = setup
    name = f"{parallel}-{first}to{second}"
    for nproc, steps in ((first, 3), (second, 5)):
        run_args = args(
            dataset, runs, name, steps, f"train.parallel={parallel}", "train.checkpoint_every=3"
        )
        if nproc == 1:
            train(load_config(None, run_args))
        else:
            assert "at step 3" in torchrun(*run_args, nproc=nproc).stdout
    torch.testing.assert_close(losses(runs / name), losses(one), rtol=1e-5, atol=1e-6)
    assert_same_weights(runs / name, one)


MESHES = {  # name: (processes, overrides)
    "tp2": (2, ("train.tensor_parallel=2",)),
    "dp2xtp2": (4, ("train.tensor_parallel=2", "train.parallel=fsdp")),
    "dp4": (4, ("train.parallel=fsdp",)),
    "one": (1, ()),
}


@pytest.mark.parametrize("mesh", ["tp2", "dp2xtp2"])
def test_tensor_parallel_gives_the_same_losses_and_weights_as_one_process(setup, mesh):
    dataset, runs, one = setup
    nproc, extra = MESHES[mesh]
    output = torchrun(*args(dataset, runs, mesh, 5, *extra), nproc=nproc).stdout
    assert output.count("finished at step 5") == 1
    torch.testing.assert_close(losses(runs / mesh), losses(one), rtol=1e-5, atol=1e-6)
    assert_same_weights(runs / mesh, one)
    assert tokens_seen(runs / mesh) == tokens_seen(one)  # tp ranks share their replica's batch


def test_tensor_parallel_builds_on_the_meta_device(setup):
    dataset, runs, _ = setup
    extra = ("train.tensor_parallel=2", "train.parallel=fsdp", "train.meta_init=true")
    output = torchrun(*args(dataset, runs, "meta-tp", 5, *extra), nproc=4).stdout
    assert "finished at step 5" in output
    run_losses = losses(runs / "meta-tp")
    assert all(math.isfinite(x) for x in run_losses) and run_losses[-1] < run_losses[0]


@pytest.mark.parametrize(
    "first,second", [("dp2xtp2", "tp2"), ("dp2xtp2", "dp4"), ("one", "tp2"), ("tp2", "one")]
)
def test_resume_under_another_mesh(setup, first, second):
    dataset, runs, one = setup
    name = f"{first}-to-{second}"
    for mesh, steps in ((first, 3), (second, 5)):
        nproc, extra = MESHES[mesh]
        run_args = args(dataset, runs, name, steps, *extra, "train.checkpoint_every=3")
        if nproc == 1:
            train(load_config(None, run_args))
        else:
            assert "at step 3" in torchrun(*run_args, nproc=nproc).stdout
    torch.testing.assert_close(losses(runs / name), losses(one), rtol=1e-5, atol=1e-6)
    assert_same_weights(runs / name, one)


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def test_elastic_restart_after_a_worker_is_killed(setup):
    dataset, runs, _ = setup
    root = runs / "elastic" / "checkpoints"
    process = torchrun(
        *args(
            dataset,
            runs,
            "elastic",
            40,
            "train.parallel=ddp",
            "train.checkpoint_every=2",
            "train.keep_checkpoints=2",
        ),
        extra=("--max-restarts=1",),
        wait=False,
    )
    try:
        deadline = time.monotonic() + 300
        while not [p for p in list_checkpoints(root) if int(p.name[5:]) >= 4]:
            assert time.monotonic() < deadline and process.poll() is None, "no checkpoint"
            time.sleep(0.2)
        workers = children(process.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)  # a real crash of one rank
        output, _ = process.communicate(timeout=400)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-3000:]
    assert "resumed from" in output and "finished at step 40" in output
