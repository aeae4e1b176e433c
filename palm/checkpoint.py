"""Checkpoints: the only place that saves or loads training state.

A checkpoint is a folder `runs/<name>/checkpoints/step_00001000/` holding
- `model.safetensors`: the weights (tied embedding stored once);
- `optimizer.safetensors`: every tensor of the optimizer state;
- `meta.json`: step, data position, RNG states, optimizer hyperparameters, the resolved config,
  validation loss, spike-detector history; plain JSON, so loading never unpickles anything.

Writes are atomic: everything goes into a temporary folder, each file is fsynced, and the folder
is renamed to its final name last. A crash (even `kill -9`) mid-write leaves the previous
checkpoints untouched and no folder that looks complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step_"
FILES = ("model.safetensors", "optimizer.safetensors", "meta.json")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message names the file and the fix."""


@dataclass
class TrainingState:
    """Everything besides weights and optimizer state that a bit-for-bit resume needs."""

    step: int  # optimizer steps completed
    sample_offset: int = 0  # training samples skipped after loss spikes (PaLM §5.1)
    tokens_seen: int = 0
    rng: dict[str, list[int]] = field(default_factory=dict)  # torch RNG states as byte lists
    recent_losses: list[float] = field(default_factory=list)  # spike-detector window
    rollbacks: int = 0
    val_loss: float | None = None  # validation loss at this step, if evaluated


def capture_rng() -> dict[str, list[int]]:
    states = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state().tolist()
    return states


def restore_rng(states: dict[str, list[int]]) -> None:
    if "torch" in states:
        torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(states["cuda"], dtype=torch.uint8))


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state keyed by parameter name -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for param_name, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_name}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{param_name}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(rest["scalars"].items()):
        param_name, name = key.rsplit(".", 1)  # state names (exp_avg, step) have no dots
        state.setdefault(param_name, {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def save_checkpoint(
    root: Path,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: TrainingState,
    config: dict[str, Any],
) -> Path:
    """Write one checkpoint atomically under `root`; returns its folder."""
    final = checkpoint_dir(root, state.step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        # safetensors refuses shared storage: store the tied embedding once (it is one tensor).
        weights = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        save_file(weights, tmp / "model.safetensors")
        tensors, rest = _flatten_optimizer(optimizer_state)
        save_file(tensors, tmp / "optimizer.safetensors")
        meta = {"format": 1, "state": state.__dict__, "optimizer": rest, "config": config}
        (tmp / "meta.json").write_text(json.dumps(meta))
        for name in FILES:
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step from before a rollback
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            raise CheckpointError(
                f"disk full while writing checkpoint {final}; free space "
                f"(older checkpoints are intact) and resume"
            ) from None
        raise CheckpointError(
            f"cannot write checkpoint {final}: {error.strerror or error}; "
            f"check that {root} is writable"
        ) from None
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and all((p / name).is_file() for name in FILES)
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({error}); delete that folder "
            f"to resume from the one before it"
        ) from None


@dataclass
class LoadedCheckpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    state: TrainingState
    config: dict[str, Any]


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read a checkpoint folder; tensors come from safetensors, the rest from JSON."""
    meta = read_meta(path)
    try:
        model_state = load_file(path / "model.safetensors")
        optimizer_tensors = load_file(path / "optimizer.safetensors")
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({error}); delete that folder to "
            f"resume from the one before it"
        ) from None
    return LoadedCheckpoint(
        path=path,
        model_state=model_state,
        optimizer_state=_unflatten_optimizer(optimizer_tensors, meta["optimizer"]),
        state=TrainingState(**meta["state"]),
        config=meta["config"],
    )


def load_checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """Only the weights of a checkpoint folder (e.g. to fine-tune from it)."""
    try:
        return load_file(path / "model.safetensors")
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(
            f"{path / 'model.safetensors'} is unreadable ({error}); re-create that checkpoint"
        ) from None


def check_same_model(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to load weights of another model shape, naming the differing keys."""
    differ = sorted(
        k for k in set(saved) | set(current) if saved.get(k) != current.get(k) and k != "dropout"
    )
    if differ:
        details = ", ".join(
            f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in differ
        )
        raise CheckpointError(
            f"checkpoint {path} is for another model ({details}); use the "
            f"matching model config or another run name (train.name=...)"
        )


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints plus the one with the best validation loss."""
    checkpoints = list_checkpoints(root)
    best, best_loss = None, float("inf")
    for path in checkpoints:
        loss = read_meta(path)["state"].get("val_loss")
        if loss is not None and loss < best_loss:
            best, best_loss = path, loss
    for path in checkpoints[:-keep]:
        if path != best:
            shutil.rmtree(path, ignore_errors=True)
