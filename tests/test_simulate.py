"""`palm info --simulate`: the dry run on the fake process group, checked against the same
steps measured for real in a 2-process gloo run, and against the analytic plan at 62B."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from palm.config import ModelConfig
from palm.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, head_dim=32, max_seq_len=256)
REAL = """
import json, sys, torch.distributed as dist
from palm.config import ModelConfig
from palm.simulate import simulate
dist.init_process_group("gloo")
peak = simulate(ModelConfig(**json.loads(sys.argv[1])), 2, "fsdp", int(sys.argv[2]), fake=False)
if dist.get_rank() == 0:
    print("PEAK", json.dumps(peak.peak_bytes))
dist.destroy_process_group()
"""
pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed"
)


@pytest.mark.parametrize("tp", [1, 2])
def test_the_dry_run_matches_a_real_two_process_run(tmp_path, tp):
    script = tmp_path / "real.py"
    script.write_text(REAL)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(script), json.dumps(SMALL), str(tp)]  # fmt: skip
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    real = json.loads(out.stdout.split("PEAK", 1)[1].splitlines()[0])
    fake = simulate(ModelConfig(**SMALL), 2, "fsdp", tp).peak_bytes
    assert fake["optimizer"] > 0 and fake["parameters"] > 0
    assert abs(fake["total"] - real["total"]) <= 0.15 * real["total"], (fake, real)


def test_eight_fake_ranks_shard_what_one_rank_holds():
    config = ModelConfig(**SMALL)
    two = simulate(config, 2, "fsdp", 2).peak_bytes
    eight = simulate(config, 8, "fsdp", 2).peak_bytes
    # four times the data-parallel ranks: a quarter of the sharded state
    assert eight["optimizer"] == pytest.approx(two["optimizer"] / 4, rel=0.05)
    assert eight["parameters"] == pytest.approx(two["parameters"] / 4, rel=0.1)


@pytest.mark.slow
def test_palm_62b_on_64_fake_gpus_fits_and_agrees_with_the_plan():
    command = [sys.executable, "-m", "palm.cli", "info", "--preset", "palm-62b", "--gpus", "64",
               "--tensor_parallel", "8", "--parallel", "fsdp", "--simulate", "--json"]  # fmt: skip
    command = [sys.executable, "-c", "import sys; from palm.cli import main; "
               "sys.exit(main(sys.argv[1:]))", *command[3:]]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout[out.stdout.index("{") :])
    simulated = info["simulated"]["peak_bytes"]["total"]
    analytic = info["per_gpu"]["bytes"]["total"]
    assert simulated < 80 * 2**30
    assert abs(simulated - analytic) <= 0.15 * analytic, (simulated, analytic)


@pytest.mark.parametrize("parallel,tp", [("none", 2), ("ddp", 1)])
def test_layouts_without_fsdp_are_measured_too(parallel, tp):
    peak = simulate(ModelConfig(**SMALL), 2, parallel, tp).peak_bytes
    parameters = 4 * (4096 * 256 + 4 * (256 * (256 + 64 + 2 * 1024) + 256 * 256 + 1024 * 256))
    assert peak["parameters"] >= parameters // tp * 0.9  # replicated (ddp) or split (tp)
    assert peak["optimizer"] >= 2 * peak["parameters"] * 0.9  # Adafactor's two moments
