"""benchmarks/gpu_check.sh is ready for the first GPU: its --cpu-dry-run runs every step at toy
size on the CPU and writes every figure the real run reports."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path / "check")}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "check.json").read_text())
    variants = [row["variant"] for row in results["training"]]
    assert variants == [
        "eager",
        "eager, plain block middle",
        "eager, compiled Adafactor",
        "compiled",
    ]
    assert all(row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 for row in results["training"])
    assert results["sdpa_backend"] != "unknown" and "math" not in results["sdpa_backend"]
    cells = [(row["batch"], row["compiled"]) for row in results["decoding"]]
    assert cells == [(1, False), (1, True)]  # the GPU run adds batch 8
    # A measurement (bf16 rounding may flip a near-tie), not a check: compiled decoding is held
    # to eager's greedy tokens in float32 by tests/test_generate.py.
    assert all(0.0 <= row["greedy_prefix_agreement"] <= 1.0 for row in results["decoding"][1::2])
    assert len(results["chunk_sweep"]) >= 2
    assert "| training (bf16) |" in (tmp_path / "check.md").read_text()
