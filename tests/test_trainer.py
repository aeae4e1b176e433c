"""The training loop: PaLM §5's recipe, bit-for-bit resume, crashes, signals and loss spikes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from palm.checkpoint import CheckpointError, list_checkpoints
from palm.config import load_config
from palm.files import TEMPORARY_GLOB
from palm.schedules import LRSchedule, lr_at
from palm.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64  # the vocabulary of conftest's synthetic `dataset`


def test_resumed_training_is_bit_identical_to_uninterrupted(
    dataset, tmp_path, tiny_config, final_weights
):
    straight = train(tiny_config(dataset, tmp_path / "a"))
    assert straight.step == 8
    half = train(tiny_config(dataset, tmp_path / "b", "train.max_steps=4"))
    assert half.step == 4
    resumed = train(tiny_config(dataset, tmp_path / "b", "train.max_steps=8"))
    assert resumed.step == 8
    a, b = final_weights(straight.run_dir), final_weights(resumed.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # And training changed the weights: the loss went down on this learnable data.
    lines = [json.loads(x) for x in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r.get("kind") == "train"]
    assert losses[-1] < losses[0]


def test_gradient_accumulation_averages_over_the_whole_batch(dataset, tmp_path, tiny_config):
    grads = []
    for micro in (8, 2):
        trainer = Trainer(
            tiny_config(dataset, tmp_path / f"m{micro}", f"data.micro_batch_size={micro}")
        )
        loss, ce, z, n = trainer.train_step(0)
        assert n == 8 * 16
        grads.append([p.grad.clone() for p in trainer.model.parameters()])
    for g_full, g_acc in zip(*grads):
        torch.testing.assert_close(g_acc, g_full, atol=1e-6, rtol=1e-5)


def test_metrics_follow_the_schedule_and_tensorboard_reads_them(dataset, tmp_path, tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(dataset, tmp_path, "optim.schedule=cosine", "optim.warmup_steps=2")
    result = train(config)
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r.get("kind") == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 9))
    for key in ("step", "tokens", "loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert key in train_records[0]
    schedule = LRSchedule(name="cosine", peak=0.01, warmup_steps=2, total_steps=8)
    assert [r["lr"] for r in train_records] == [lr_at(k, schedule) for k in range(8)]
    assert train_records[-1]["tokens"] == 8 * 8 * 16
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1]["val_perplexity"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "train/loss" in scalars and "eval/val_loss" in scalars
    loss_events = events.Scalars("train/loss")
    assert [e.step for e in loss_events] == list(range(1, 9))
    assert loss_events[-1].value == pytest.approx(train_records[-1]["loss"], rel=1e-6)
    saved = load_config(result.run_dir / "config.yaml")
    assert saved.model.vocab_size == VOCAB and saved.data.seq_len == 16


def test_keeps_last_checkpoints_plus_best(dataset, tmp_path, tiny_config):
    result = train(
        tiny_config(
            dataset,
            tmp_path,
            "train.checkpoint_every=1",
            "train.eval_every=1",
            "train.keep_checkpoints=2",
            "train.max_steps=6",
        )
    )
    kept = [int(p.name[5:]) for p in list_checkpoints(result.run_dir / "checkpoints")]
    assert kept[-2:] == [5, 6] and len(kept) <= 3
    assert not [p for p in (result.run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


class SpikeOnce(Trainer):
    """The loss of step 6 turns non-finite once: it must never reach the weights."""

    spiked = False

    def loss(self, step, micro_step, out):
        if step == 6 and not self.spiked:
            self.spiked = True
            return out.loss * float("inf")
        return out.loss


def test_loss_spike_rolls_back_and_skips_batches(dataset, tmp_path, tiny_config, final_weights):
    config = tiny_config(
        dataset,
        tmp_path,
        "train.max_steps=10",
        "train.checkpoint_every=2",
        "train.rollback_steps=2",
        "train.skip_batches=3",
    )
    trainer = SpikeOnce(config)
    result = trainer.fit()
    assert result.rollbacks == 1 and result.step == 10
    weights = final_weights(result.run_dir)
    assert all(torch.isfinite(w).all() for w in weights.values())
    events = [
        json.loads(x)
        for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss_spike"' in x
    ]
    assert len(events) == 1
    assert events[0]["rolled_back_to"] == 4 and events[0]["skipped_batches"] == 3
    # After the rollback, step 4 reads the batch step 7 would have read (3 batches skipped).
    assert trainer.state.sample_offset == 3 * 8


def test_detector_flags_a_loss_far_above_its_history():
    from palm.guards import SpikeDetector

    detector = SpikeDetector(
        window=50, sigma=6.0, ratio=1.5, history=[3.0 + 0.01 * (i % 5) for i in range(50)]
    )
    assert not detector.is_spike(3.05)
    assert detector.is_spike(9.0)
    assert detector.is_spike(float("nan"))
    assert not SpikeDetector(50, 6.0, 1.5, [3.0] * 5).is_spike(9.0)  # too little history


def test_checkpoint_of_another_model_is_refused(dataset, tmp_path, tiny_config):
    train(tiny_config(dataset, tmp_path, "train.max_steps=2"))
    with pytest.raises(CheckpointError, match="another model.*d_model"):
        train(tiny_config(dataset, tmp_path, "train.max_steps=4", "model.d_model=64"))
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(tiny_config(dataset, tmp_path, "train.resume=never"))


def test_full_disk_while_checkpointing_keeps_previous_checkpoint(
    dataset, tmp_path, monkeypatch, tiny_config
):
    import errno

    import palm.checkpoint as checkpoint

    result = train(tiny_config(dataset, tmp_path, "train.max_steps=4"))
    before = list_checkpoints(result.run_dir / "checkpoints")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(CheckpointError, match="disk full"):
        train(tiny_config(dataset, tmp_path, "train.max_steps=6"))
    assert list_checkpoints(result.run_dir / "checkpoints") == before
    assert not [p for p in (result.run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bad_input_gives_one_line_errors(tmp_path):
    missing = run_cli(f"data.path={tmp_path}/nothing", cwd=tmp_path)
    assert missing.returncode != 0
    assert "meta.json" in missing.stderr and "download.py" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    unknown = run_cli("train.max_stepz=3", cwd=tmp_path)
    assert unknown.returncode == 2 and "max_steps" in unknown.stderr  # lists the valid keys
    wrong_type = run_cli("train.max_steps=many", cwd=tmp_path)
    assert wrong_type.returncode == 2 and "must be a int" in wrong_type.stderr


def test_unwritable_run_folder_as_any_user(dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_cli(f"data.path={dataset}", f"train.runs_dir={blocker}", cwd=tmp_path)
    assert result.returncode == 2 and "not writable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def start_training(dataset: Path, runs: Path, *extra: str) -> subprocess.Popen:
    args = [
        f"data.path={dataset}",
        f"train.runs_dir={runs}",
        "train.name=t",
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.head_dim=16",
        "train.max_steps=100000",
        "train.log_every=1",
        "train.eval_every=0",
        "train.sample_tokens=0",
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=runs.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_exits_zero(dataset, tmp_path):
    runs = tmp_path / "runs"
    process = start_training(dataset, runs, "train.checkpoint_every=0")
    metrics = runs / "t" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 3)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "(signal)" in out
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    checkpoints = list_checkpoints(runs / "t" / "checkpoints")
    assert int(checkpoints[-1].name[5:]) == last_logged


@pytest.mark.slow
def test_kill_9_during_checkpoint_write_leaves_a_resumable_run(dataset, tmp_path):
    runs = tmp_path / "runs"
    root = runs / "t" / "checkpoints"
    process = start_training(dataset, runs, "train.checkpoint_every=1", "train.keep_checkpoints=50")
    wait_for(lambda: len(list_checkpoints(root)) >= 3)
    # Kill the moment a checkpoint is being written (a temporary folder exists).
    try:
        wait_for(
            lambda: root.is_dir() and any(p.match(TEMPORARY_GLOB) for p in root.iterdir()),
            timeout=30,
        )
    except TimeoutError:
        pass
    process.kill()
    process.wait(timeout=60)
    complete = list_checkpoints(root)
    assert complete
    last = int(complete[-1].name[5:])
    result = run_cli(
        f"data.path={dataset}",
        f"train.runs_dir={runs}",
        "train.name=t",
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.head_dim=16",
        f"train.max_steps={last + 2}",
        "train.sample_tokens=0",
        "--resume",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert f"at step {last}" in result.stdout and f"finished at step {last + 2}" in result.stdout


def test_fine_tuning_starts_from_another_runs_weights(
    dataset, tmp_path, tiny_config, final_weights
):
    source = train(tiny_config(dataset, tmp_path / "pre", "train.max_steps=4"))
    # The model shape comes from the checkpoint, not from this run's (different) model section.
    tuned = train(
        tiny_config(
            dataset,
            tmp_path / "ft",
            "train.max_steps=2",
            f"train.init_from={source.run_dir}",
            "model.d_model=64",
            "model.dropout=0.1",
        )
    )
    start = load_file(list_checkpoints(tuned.run_dir / "checkpoints")[0] / "model.safetensors")
    assert list_checkpoints(tuned.run_dir / "checkpoints")[0].name == "step_00000000"
    for key, value in final_weights(source.run_dir).items():
        assert torch.equal(start[key], value), key
    saved = load_config(tuned.run_dir / "config.yaml")
    assert saved.model.d_model == 32 and saved.model.dropout == 0.1


def test_no_validation_data_is_said_once_at_start_in_words(tmp_path, make_dataset, capsys):
    """A dataset without held-out tokens: one note at start, and words (not "n/a") at the end."""
    from palm.cli.train import main

    data = make_dataset(tmp_path / "only-train", np.arange(3000) % 60 + 2, vocab_size=64)
    code = main(
        [
            f"data.path={data}",
            f"train.runs_dir={tmp_path / 'runs'}",
            "model.d_model=32",
            "model.n_layers=2",
            "model.n_heads=2",
            "model.head_dim=16",
            "train.max_steps=3",
            "train.eval_every=1",
            "train.sample_tokens=0",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("has no validation tokens") == 1
    assert out.index("has no validation tokens") < out.index("step 3/3")
    last = out.strip().splitlines()[-1]
    assert "no validation data" in last and "n/a" not in last


def test_a_long_cpu_run_says_what_it_will_do_and_how_long_it_takes(
    dataset, tmp_path, tiny_config, capsys
):
    config = tiny_config(
        dataset,
        tmp_path,
        "train.max_steps=10000000",
        "train.max_minutes=0.03",
        "train.checkpoint_every=0",
        "train.eval_every=0",
        "train.log_every=1000",
    )
    result = train(config)
    assert result.stopped_by == "time_limit"
    lines = [x for x in capsys.readouterr().out.splitlines() if not x.startswith("note:")]
    assert lines[0].startswith("plan:") and "steps 0 to 10,000,000 of 8 x 16 tokens" in lines[0]
    eta = next(x for x in lines if x.startswith("eta:"))
    assert "more steps" in eta and "tokens/s on this CPU" in eta
    assert "for a CPU try --config configs/cpu-quickstart.yaml" in eta
    assert lines.index(eta) < 3  # said at once, not at the end


@pytest.mark.slow
def test_train_compile_compiles_the_optimizer_update_too(
    dataset, tmp_path, tiny_config, final_weights
):
    """train.compile=true: the model and PaLM Adafactor's update compiled; the weights after 8
    steps are those of the eager run (the same math, fused: equal to float rounding)."""
    eager = train(tiny_config(dataset, tmp_path / "eager"))
    trainer = Trainer(tiny_config(dataset, tmp_path / "compiled", "train.compile=true"))
    assert trainer.optimizer.compiled
    try:
        compiled = trainer.fit()
    finally:
        trainer.world.close()
    assert compiled.step == eager.step == 8
    a, b = final_weights(eager.run_dir), final_weights(compiled.run_dir)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
