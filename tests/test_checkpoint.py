"""palm.checkpoint on its own: atomic checkpoint folders, listing, pruning, resolving a run
folder, the one checkpoint -> model loader, and run folders."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import palm.checkpoint as checkpoint
from palm.checkpoint import (
    TrainingState,
    check_same_model,
    checkpoints_to_resume,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from palm.config import Config, ModelConfig, load_config
from palm.errors import CheckpointError, ConfigError, CorruptCheckpointError, DataError
from palm.model import PaLM
from palm.runs import (
    find_tokenizer,
    init_from,
    load_model,
    prepare_run_dir,
    resolve_checkpoint,
    saved_config,
)
from palm.saving import load_checkpoint_weights

TINY = ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, head_dim=8, max_seq_len=32)


def write(
    root: Path, step: int, val_loss: float | None = None, seed: int = 0, rollbacks: int = 0
) -> Path:
    torch.manual_seed(seed)
    model = PaLM(TINY)
    param = next(model.parameters())
    optimizer_state = {
        "state": {"embedding.weight": {"exp_avg": torch.ones_like(param), "step": 3}},
        "param_groups": [{"lr": 0.01, "params": ["embedding.weight"]}],
    }
    state = TrainingState(
        step=step, sample_offset=5, tokens_seen=99, val_loss=val_loss, rollbacks=rollbacks
    )
    return save_checkpoint(
        root, model.state_dict(), optimizer_state, state, Config(model=TINY).to_dict()
    )


def test_a_checkpoint_reads_back_what_was_saved(tmp_path):
    path = write(tmp_path, 7, val_loss=1.25)
    assert path.name == "step_00000007"
    loaded = load_checkpoint(path)
    torch.manual_seed(0)
    expected = PaLM(TINY).state_dict()
    assert loaded.model_state.keys() == expected.keys()
    assert all(torch.equal(loaded.model_state[k], expected[k]) for k in expected)
    assert loaded.state == TrainingState(step=7, sample_offset=5, tokens_seen=99, val_loss=1.25)
    assert loaded.optimizer_state["state"]["embedding.weight"]["step"] == 3
    assert saved_config(path) == Config(model=TINY)
    meta = json.loads((path / "meta.json").read_text())  # plain JSON: nothing to unpickle
    assert meta["state"]["step"] == 7


def test_a_failed_write_leaves_earlier_checkpoints_and_no_debris(tmp_path, monkeypatch):
    first = write(tmp_path, 1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(CheckpointError, match="disk full.*older checkpoints are intact"):
        write(tmp_path, 2)
    assert list_checkpoints(tmp_path) == [first]
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]


def test_only_complete_checkpoints_are_listed_in_step_order(tmp_path):
    for step in (10, 2, 100):
        write(tmp_path, step)
    (tmp_path / "step_00000050").mkdir()  # an incomplete folder (no files)
    (tmp_path / ".step_00000060.tmp-123").mkdir()  # a write in progress
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step_00000002",
        "step_00000010",
        "step_00000100",
    ]
    assert list_checkpoints(tmp_path / "missing") == []


def test_pruning_keeps_the_newest_and_the_best(tmp_path):
    for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, None)):
        write(tmp_path, step, loss)
    prune_checkpoints(tmp_path, keep=2)
    assert [int(p.name[5:]) for p in list_checkpoints(tmp_path)] == [2, 4, 5]


def test_a_run_folder_resolves_to_its_best_or_latest(tmp_path):
    run = tmp_path / "run"
    best = write(run / "checkpoints", 1, 1.0)
    latest = write(run / "checkpoints", 2, 2.0)
    assert resolve_checkpoint(run) == best
    assert resolve_checkpoint(run, "latest") == latest
    assert resolve_checkpoint(latest) == latest
    assert resolve_checkpoint(run / "checkpoints", "latest") == latest
    unscored = tmp_path / "unscored"
    write(unscored, 1)
    newest = write(unscored, 2)
    assert resolve_checkpoint(unscored, "best") == newest  # nothing evaluated: the latest
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(ConfigError, match="which must be one of"):
        resolve_checkpoint(run, "oldest")


def test_load_model_builds_the_saved_model_exactly(tmp_path):
    path = write(tmp_path, 3, 0.5, seed=4)
    loaded = load_model(tmp_path, require_tokenizer=False)
    torch.manual_seed(4)
    reference = PaLM(TINY).eval()
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    assert torch.equal(loaded.model(tokens), reference(tokens))
    assert (loaded.path, loaded.step, loaded.val_loss) == (path, 3, 0.5)
    assert not loaded.model.training and loaded.tokenizer is None
    with pytest.raises(CheckpointError, match="no tokenizer.model"):
        load_model(tmp_path)


def test_load_model_refuses_corrupt_or_mismatched_weights(tmp_path):
    path = write(tmp_path, 1)
    meta = json.loads((path / "meta.json").read_text())
    meta["config"]["model"]["d_model"] = 32
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match its saved config"):
        load_model(path, require_tokenizer=False)
    meta["config"]["model"]["d_modle"] = 32
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="config is unusable"):
        load_model(path, require_tokenizer=False)
    other = write(tmp_path / "b", 1)
    (other / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors does not match the sha256"):
        load_model(other, require_tokenizer=False)
    # A checkpoint from before hashes were recorded (format 1): safetensors itself refuses it.
    meta = json.loads((other / "meta.json").read_text())
    del meta["sha256"]
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match="model.safetensors is corrupt"):
        load_model(other, require_tokenizer=False)


def test_tokenizer_is_found_next_to_the_checkpoint_or_its_run(tmp_path):
    path = write(tmp_path / "run" / "checkpoints", 1)
    assert find_tokenizer(path) is None
    (tmp_path / "run" / "tokenizer.model").write_bytes(b"x")
    assert find_tokenizer(path) == tmp_path / "run" / "tokenizer.model"
    (path / "tokenizer.model").write_bytes(b"y")
    assert find_tokenizer(path) == path / "tokenizer.model"
    assert find_tokenizer(path, "elsewhere.model") == Path("elsewhere.model")


def test_resume_modes(tmp_path):
    assert checkpoints_to_resume(tmp_path, "auto") == []
    assert checkpoints_to_resume(tmp_path, "never") == []
    with pytest.raises(CheckpointError, match="no complete checkpoint .* to resume"):
        checkpoints_to_resume(tmp_path, "must")
    first = write(tmp_path, 1)
    last = write(tmp_path, 2)
    assert checkpoints_to_resume(tmp_path, "auto") == [last, first]  # newest first
    assert checkpoints_to_resume(tmp_path, "must") == [last, first]
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        checkpoints_to_resume(tmp_path, "never")


def test_another_model_shape_is_refused_naming_the_keys():
    check_same_model(Path("c"), TINY, ModelConfig(**{**TINY.to_dict(), "dropout": 0.1}))
    with pytest.raises(CheckpointError, match="d_model: checkpoint 16 vs config 32"):
        check_same_model(Path("c"), TINY, ModelConfig(**{**TINY.to_dict(), "d_model": 32}))


def test_run_folder_holds_the_resolved_config_and_the_tokenizer(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer.model").write_bytes(b"pieces")
    config = load_config(None, [f"data.path={data}", f"train.runs_dir={tmp_path / 'runs'}"])
    run_dir, sha = prepare_run_dir(config, is_main=True)
    assert run_dir == tmp_path / "runs" / "default"
    assert load_config(run_dir / "config.yaml") == config
    assert (run_dir / "tokenizer.model").read_bytes() == b"pieces"
    assert sha == hashlib.sha256(b"pieces").hexdigest()
    other = load_config(None, [f"data.path={data}", f"train.runs_dir={tmp_path / 'r2'}"])
    run_dir, _ = prepare_run_dir(other, is_main=False)  # other ranks check, but write nothing
    assert list(run_dir.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="not writable"):
        prepare_run_dir(load_config(None, [f"train.runs_dir={blocker}"]), is_main=True)
    assert not [p for p in (tmp_path / "runs" / "default").iterdir() if p.name.startswith(".")]
    assert os.access(tmp_path / "runs" / "default" / "config.yaml", os.R_OK)


def test_fine_tuning_takes_the_checkpoints_shape_and_checks_the_tokenizer(tmp_path):
    run = tmp_path / "run"
    write(run / "checkpoints", 1)
    (run / "tokenizer.model").write_bytes(b"theirs")
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer.model").write_bytes(b"theirs")
    config = load_config(None, [f"train.init_from={run}", f"data.path={data}", "model.dropout=0.1"])
    tuned = init_from(config)
    assert tuned.model == ModelConfig(**{**TINY.to_dict(), "dropout": 0.1})
    (data / "tokenizer.model").write_bytes(b"ours")
    with pytest.raises(DataError, match="another tokenizer"):
        init_from(config)


class Killed(Exception):
    """Stands in for SIGKILL: the process stops where it is."""


def test_pruning_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    """A kill while a pruned checkpoint is deleted leaves it under a trash name only."""
    from palm import files

    for step in (1, 2, 3):
        write(tmp_path, step)

    def killed_midway(path, **kwargs):
        next(iter(path.iterdir())).unlink()  # some of its files are gone ...
        raise Killed  # ... when the process dies

    monkeypatch.setattr(files.shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        checkpoint.prune_checkpoints(tmp_path, keep=1)
    monkeypatch.undo()
    for path in tmp_path.glob("step_*"):
        assert all((path / name).is_file() for name in checkpoint.FILES), path
    assert [p.name for p in files.stale(tmp_path)] == [f".step_00000001.trash-{os.getpid()}"]
    assert checkpoint.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]


def test_start_up_removes_only_what_dead_writers_left(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f".step_5.tmp-{dead}", f".step_6.tmp-{alive.pid}", f".step_7.trash-{dead}"):
            (tmp_path / name).mkdir()
        removed = sorted(p.name for p in checkpoint.clean_stale(tmp_path))
        assert removed == [f".step_5.tmp-{dead}", f".step_7.trash-{dead}"]
        assert [p.name for p in tmp_path.iterdir()] == [f".step_6.tmp-{alive.pid}"]
    finally:
        alive.kill()
        alive.wait()


def test_newest_is_the_highest_rollbacks_then_step(tmp_path):
    """After a rollback to step 2 its own checkpoint outranks the abandoned step 3, so a crash
    before step 3 is removed still resumes on the new path."""
    write(tmp_path, 1)
    abandoned = write(tmp_path, 3)
    rolled_back = write(tmp_path, 2, rollbacks=1)
    assert list_checkpoints(tmp_path)[-1] == rolled_back
    assert checkpoints_to_resume(tmp_path, "auto")[0] == rolled_back
    assert checkpoint.discard_after(tmp_path, 2) == [abandoned]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]


def test_a_flipped_bit_in_tensor_data_is_caught(tmp_path):
    path = write(tmp_path, 1)
    load_checkpoint(path)
    data = bytearray((path / "optimizer.safetensors").read_bytes())
    data[-3] ^= 0x10  # past the header: safetensors itself would load it
    (path / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="optimizer.safetensors does not match"):
        load_checkpoint(path)
    assert load_checkpoint_weights(path)  # the weights alone still verify


def test_replacing_a_checkpoint_keeps_its_name_in_place(tmp_path):
    first = write(tmp_path, 4, seed=1)
    again = write(tmp_path, 4, seed=2)  # the same step, e.g. the state a rollback restored
    assert again == first and list_checkpoints(tmp_path) == [first]
    torch.manual_seed(2)
    expected = PaLM(TINY).state_dict()
    loaded = load_checkpoint(first).model_state
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]
