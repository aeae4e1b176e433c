"""Runs that survive faults (issue 12): rollbacks that no crash can undo, non-finite gradients
that are never applied, corrupt checkpoints that are skipped, a batch ramp fixed for the run,
and checkpoint folders that stay clean whatever is killed when."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from palm import checkpoint
from palm.checkpoint import list_checkpoints, step_of
from palm.errors import ConfigError, CorruptCheckpointError
from palm.runs import load_model
from palm.trainer import Trainer


class Crash(Exception):
    """Stands in for a kill: raised out of the loop with nothing cleaned up."""


class SpikeThenCrash(Trainer):
    """Step 6's loss turns non-finite once (a spike: rolled back to step 4); after that, the
    run dies at step `crash_at` (before training has passed the spike again)."""

    crash_at = 4  # the first step after the rollback
    spiked = False

    def loss(self, step, micro_step, out):
        if step == 6 and not self.spiked:
            self.spiked = True
            return out.loss * float("inf")
        if self.spiked and step == self.crash_at:
            raise Crash
        return out.loss


def events(run_dir, name):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if f'"{name}"' in x]


def test_a_crash_after_a_rollback_resumes_on_the_new_path(dataset, tmp_path, tiny_config):
    config = tiny_config(
        dataset,
        tmp_path,
        "train.max_steps=10",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=10",
        "train.rollback_steps=2",
        "train.skip_batches=3",
    )
    trainer = SpikeThenCrash(config)
    with pytest.raises(Crash):
        trainer.fit()
    root = trainer.ckpt_root
    # The abandoned checkpoints (steps 5 and 6 of the old path) are gone; step 4 is the
    # rolled-back state itself, with the skipped batches recorded.
    assert max(step_of(p) for p in list_checkpoints(root)) == 4
    newest = checkpoint.load_checkpoint(list_checkpoints(root)[-1]).state
    assert (newest.step, newest.rollbacks, newest.sample_offset) == (4, 1, 3 * 8)
    resumed = Trainer(config)
    result = resumed.fit()
    assert result.step == 10 and result.rollbacks == 1
    assert resumed.state.sample_offset == 3 * 8  # the skip survived the crash


class PoisonedGradient(Trainer):
    """A NaN in one gradient at the steps in `poison`, with a finite loss."""

    poison: tuple[int, ...] = (5,)  # each step poisoned once (not again after a rollback)

    def train_step(self, step):
        out = super().train_step(step)
        if step in self.poison and step not in self.__dict__.setdefault("done", set()):
            self.done.add(step)
            next(self.model.parameters()).grad.view(-1)[0] = float("nan")
        return out


def test_a_nonfinite_gradient_is_never_applied_and_counted(dataset, tmp_path, tiny_config):
    config = tiny_config(dataset, tmp_path, "train.checkpoint_every=1", "train.keep_checkpoints=20")
    trainer = PoisonedGradient(config)
    result = trainer.fit()
    assert result.step == 8 and result.rollbacks == 0
    assert trainer.state.nonfinite_steps == [5]
    weights = [
        checkpoint.load_checkpoint(p).model_state for p in list_checkpoints(trainer.ckpt_root)
    ]
    by_step = dict(zip((step_of(p) for p in list_checkpoints(trainer.ckpt_root)), weights))
    assert all(torch.equal(by_step[5][k], by_step[6][k]) for k in by_step[5])  # skipped
    assert not all(torch.equal(by_step[6][k], by_step[7][k]) for k in by_step[6])  # trains on
    assert all(torch.isfinite(w).all() for w in by_step[8].values())
    assert [e["step"] for e in events(result.run_dir, "nonfinite_gradient")] == [5]


def test_repeated_nonfinite_gradients_roll_back(dataset, tmp_path, tiny_config):
    config = tiny_config(
        dataset,
        tmp_path,
        "train.checkpoint_every=2",
        "train.rollback_steps=2",
        "train.skip_batches=1",
        "train.max_steps=10",
    )
    trainer = PoisonedGradient(config)
    trainer.poison = (5, 6)
    result = trainer.fit()
    assert result.rollbacks == 1 and result.step == 10
    (spike,) = events(result.run_dir, "loss_spike")
    assert spike["step"] == 6 and "non-finite gradient" in spike["reason"]
    assert spike["rolled_back_to"] == 4


def test_without_spike_detection_a_nonfinite_gradient_stops_the_run(dataset, tmp_path, tiny_config):
    from palm.errors import TrainingError

    trainer = PoisonedGradient(tiny_config(dataset, tmp_path, "train.spike_detection=false"))
    with pytest.raises(TrainingError, match="non-finite loss or gradient at step 5"):
        trainer.fit()


def flip_a_tensor_byte(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data, past the header: only the hash can tell
    path.write_bytes(bytes(data))


def test_a_corrupt_newest_checkpoint_is_skipped_not_deleted(dataset, tmp_path, tiny_config, capsys):
    config = tiny_config(dataset, tmp_path, "train.checkpoint_every=2", "train.keep_checkpoints=5")
    first = Trainer(config)
    first.fit()
    newest = list_checkpoints(first.ckpt_root)[-1]
    assert step_of(newest) == 8
    flip_a_tensor_byte(newest)
    with pytest.raises(CorruptCheckpointError, match="does not match the sha256"):
        checkpoint.load_checkpoint(newest)
    capsys.readouterr()
    resumed = Trainer(tiny_config(dataset, tmp_path, "train.max_steps=10"))
    result = resumed.fit()
    err = capsys.readouterr().err
    kept = newest.with_name(newest.name + ".corrupt")
    assert f"warning: checkpoint {newest}" in err and f"moved to {kept.name}" in err
    assert result.step == 10 and kept.is_dir()  # kept for inspection, out of the way
    assert [step_of(p) for p in list_checkpoints(first.ckpt_root)][-2:] == [8, 10]
    # Inference on the run folder falls back too (10 is now corrupt: the new 8), saying so; on
    # the checkpoint folder itself it is an error.
    ten = list_checkpoints(first.ckpt_root)[-1]
    flip_a_tensor_byte(ten)
    loaded = load_model(first.run_dir, "latest", require_tokenizer=False)
    assert loaded.step == 8 and loaded.path == newest
    assert f"warning: checkpoint {ten}" in capsys.readouterr().err
    assert ten.is_dir()  # inference never moves anything
    with pytest.raises(CorruptCheckpointError, match="does not match the sha256"):
        load_model(ten, require_tokenizer=False)


class StopAt(Trainer):
    stop_at = 4

    def loss(self, step, micro_step, out):
        if step == self.stop_at:
            raise Crash
        return out.loss


def test_a_resume_with_more_steps_keeps_the_batch_ramp(dataset, tmp_path, tiny_config):
    ramp = ("optim.batch_ramp=true", "train.checkpoint_every=1", "data.micro_batch_size=1")
    planned = Trainer(tiny_config(dataset, tmp_path / "a", "train.max_steps=8", *ramp))
    expected = [planned.batch_indices(k).tolist() for k in range(8)]
    interrupted = StopAt(tiny_config(dataset, tmp_path / "b", "train.max_steps=8", *ramp))
    with pytest.raises(Crash):
        interrupted.fit()
    longer = Trainer(tiny_config(dataset, tmp_path / "b", "train.max_steps=16", *ramp))
    longer.resume()
    assert longer.state.step == 4
    assert [longer.batch_indices(k).tolist() for k in range(8)] == expected
    # Without the stored ramp, 16 steps would move the boundaries and read other samples.
    fresh = Trainer(tiny_config(dataset, tmp_path / "c", "train.max_steps=16", *ramp))
    assert [fresh.batch_indices(k).tolist() for k in range(8)] != expected
    changed = Trainer(
        tiny_config(dataset, tmp_path / "b", "train.max_steps=16", "data.batch_size=4", *ramp)
    )
    with pytest.raises(ConfigError, match="batch sizes by step"):
        changed.resume()


@pytest.mark.slow
def test_fault_injection_benchmark_in_small(tmp_path):
    """benchmarks/faults.py with a few kills: every figure it reports is the one required."""
    from pathlib import Path

    out = tmp_path / "faults.json"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "benchmarks/faults.py", "--kills", "3", "--prune-kills", "2"]
        + ["--json", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    for scenario in ("kills", "prune_kills"):
        f = figures[scenario]
        assert f["incomplete_after_kill"] == [0] * f["kills"], f
        assert f["restarts_resumed"] == f["kills"] - 1, f
        assert f["final_exit"] == 0 and f["final_resumed"], f
        assert f["stale_after_final"] == 0 and f["incomplete_after_final"] == 0, f
    for damage in ("flipped byte", "truncated optimizer", "deleted meta.json"):
        f = figures[damage]
        assert f["exit"] == 0 and f["resumed_from"].startswith("step_00000004"), f
        assert f["warning"].startswith("warning: checkpoint") and f["damaged_kept"], f
    full = figures["disk full"]
    assert full["error"].startswith("disk full") and full["debris"] == 0, full
    assert full["checkpoints_intact"] and full["rerun_exit"] == 0 and full["rerun_resumed"], full
    term = figures["torchrun sigterm"]
    assert term["stopped_by_signal"] and term["checkpoint_of_last_step"], term
    assert term["resume_exit"] == 0 and term["resumed"], term
