"""Sharded checkpoints (palm.saving) in one process: the layout, consolidation for inference,
background saves that overlap training, and a kill -9 during one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from palm.checkpoint import is_sharded, list_checkpoints
from palm.files import TEMPORARY_GLOB
from palm.saving import load_checkpoint_weights
from palm.trainer import train

ROOT = Path(__file__).resolve().parents[1]
SLOW_WRITES = """
import os, time
from torch.distributed.checkpoint.filesystem import FileSystemWriter
_write = FileSystemWriter.write_data
def write_data(self, plan, planner):
    with open(os.environ["PALM_TEST_WRITES"], "a") as marker:
        marker.write("write\\n")
    time.sleep(float(os.environ["PALM_TEST_WRITE_SECONDS"]))
    return _write(self, plan, planner)
FileSystemWriter.write_data = write_data
"""


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_async_saves_overlap_training_and_change_nothing(
    dataset, tmp_path, tiny_config, monkeypatch
):
    plain = train(tiny_config(dataset, tmp_path / "plain", "train.checkpoint_every=2"))
    write = FileSystemWriter.write_data

    def slow_write(self, plan, planner):
        time.sleep(0.5)  # in the background thread: training must not wait for it
        return write(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", slow_write)
    run = train(
        tiny_config(
            dataset, tmp_path / "async", "train.checkpoint_every=2", "train.async_checkpoint=true"
        )
    )
    losses = [r["loss"] for r in records(run.run_dir, "train")]
    assert losses == [r["loss"] for r in records(plain.run_dir, "train")]
    written = {r["step"]: r["time"] for r in records(run.run_dir, "checkpoint_written")}
    train_times = {r["step"]: r["time"] for r in records(run.run_dir, "train")}
    started = [r["step"] for r in records(run.run_dir, "checkpoint") if r["step"] in (2, 4)]
    assert started == [2, 4]
    for step in started:  # the next step ran while the save was still being written
        assert train_times[step + 1] < written[step], (train_times, written)
    newest = list_checkpoints(run.run_dir / "checkpoints")[-1]
    assert is_sharded(newest) and newest.name == "step_00000008"
    plain_weights = load_file(
        list_checkpoints(plain.run_dir / "checkpoints")[-1] / "model.safetensors"
    )
    for key, value in load_checkpoint_weights(newest).items():
        torch.testing.assert_close(value, plain_weights[key], rtol=0, atol=0)


def test_palm_export_consolidates_a_sharded_checkpoint(dataset, tmp_path, tiny_config):
    run = train(tiny_config(dataset, tmp_path / "runs", "train.async_checkpoint=true"))
    out = tmp_path / "model.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    main = "import sys; from palm.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", main, "export", "--checkpoint", str(run.run_dir),
               "--to", "safetensors", str(out)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and result.stderr == ""
    exported = load_file(out)
    expected = load_checkpoint_weights(list_checkpoints(run.run_dir / "checkpoints")[-1])
    assert exported.keys() == expected.keys()
    for key in exported:
        assert torch.equal(exported[key], expected[key]), key


def test_a_damaged_shard_is_caught(dataset, tmp_path, tiny_config):
    run = train(tiny_config(dataset, tmp_path / "runs", "train.async_checkpoint=true"))
    newest = list_checkpoints(run.run_dir / "checkpoints")[-1]
    shard = next((newest / "state").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    from palm.errors import CorruptCheckpointError

    with pytest.raises(CorruptCheckpointError, match="does not match the sha256"):
        load_checkpoint_weights(newest)


@pytest.mark.slow
def test_kill_9_during_an_async_save_keeps_the_previous_checkpoint(dataset, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_WRITES)
    marker, runs = tmp_path / "writes", tmp_path / "runs"
    root = runs / "t" / "checkpoints"
    args = [
        str(ROOT / "train.py"), f"data.path={dataset}", f"train.runs_dir={runs}", "train.name=t",
        "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.head_dim=16",
        "train.log_every=1", "train.eval_every=0", "train.sample_tokens=0",
        "train.async_checkpoint=true", "train.checkpoint_every=2",
    ]  # fmt: skip
    env = dict(
        os.environ,
        PYTHONPATH=f"{hooks}{os.pathsep}{ROOT}",
        PALM_TEST_WRITES=str(marker),
        PALM_TEST_WRITE_SECONDS="2",
    )
    process = subprocess.Popen(
        [sys.executable, *args, "train.max_steps=100000"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        # Writes 1 and 2 (steps 0 and 2) are published once write 3 (step 4) has begun.
        while not (marker.exists() and len(marker.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)  # well inside the 2-second write of step 4
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    complete = [p.name for p in list_checkpoints(root)]
    assert complete[-1] == "step_00000002", complete
    assert any(p.match(TEMPORARY_GLOB) for p in root.iterdir())  # the unfinished save
    env["PALM_TEST_WRITE_SECONDS"] = "0"
    resumed = subprocess.run(
        [sys.executable, *args, "train.max_steps=4", "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    assert "finished at step 4" in resumed.stdout
    assert not any(p.match(TEMPORARY_GLOB) for p in root.iterdir())
