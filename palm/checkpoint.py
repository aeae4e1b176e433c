"""Checkpoints: the only place that writes, verifies, lists and removes them.

A checkpoint is a folder `runs/<name>/checkpoints/step_00001000/` holding `model.safetensors`
(the weights, tied embedding stored once), `optimizer.safetensors` and `meta.json` (step, data
position, batch ramp, RNG states, optimizer hyperparameters, the resolved config, validation
loss, and the sha256 of both tensor files); plain safetensors and JSON, so loading never
unpickles anything, and loading verifies the hashes, so a flipped bit is caught.

Crash safety: a `step_*` folder only ever appears by renaming a finished, fsynced temporary
folder, and only ever disappears by being renamed out of the namespace first (`files.discard`),
so after any `kill -9` every `step_*` folder is complete. What dead writers left under temporary
or trash names is removed at start-up (`clean_stale`). "Newest" is the highest (rollbacks, step):
a rollback's own checkpoint outranks the abandoned later ones until they are removed.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from palm.config import ModelConfig
from palm.errors import CheckpointError, CorruptCheckpointError
from palm.files import (
    discard,
    fsync_dir,
    fsync_file,
    publish,
    publish_dir,
    remove,
    sha256_file,
    stale,
    temporary_path,
)

PREFIX = "step_"
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")
FILES = (*TENSOR_FILES, "meta.json")
STATE = "state"  # a sharded checkpoint's torch.distributed.checkpoint folder (palm.saving)
FORMAT = 2  # 2: meta.json records the sha256 of the tensor files (1 did not; still loadable)


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
    # The batch ramp's (until_step, batch_size) stages, fixed when the run started, so a resume
    # with another train.max_steps reads the same samples (PaLM §5: batch = f(step) only).
    ramp: list[list[int]] = field(default_factory=list)
    nonfinite_steps: list[int] = field(default_factory=list)  # updates skipped: inf/NaN gradient


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


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def save_checkpoint(
    root: Path,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: TrainingState,
    config: dict[str, Any],
) -> Path:
    """Write one checkpoint atomically under `root` (replacing one of the same step, e.g. after
    a rollback); returns its folder."""
    final = checkpoint_dir(root, state.step)
    tmp = temporary_path(final)
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove(tmp)
        tmp.mkdir()
        # safetensors refuses shared storage: store the tied embedding once (it is one tensor).
        weights = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        save_file(weights, tmp / "model.safetensors")
        tensors, rest = _flatten_optimizer(optimizer_state)
        save_file(tensors, tmp / "optimizer.safetensors")
        sha256 = {name: sha256_file(tmp / name) for name in TENSOR_FILES}
        meta = {
            "format": FORMAT,
            "state": state.__dict__,
            "optimizer": rest,
            "config": config,
            "sha256": sha256,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        for name in FILES:
            fsync_file(tmp / name)
        fsync_dir(tmp)
        publish_dir(tmp, final)
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


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptCheckpointError(
            f"checkpoint {path}: meta.json is unreadable ({error})"
        ) from None
    if not isinstance(meta, dict) or not {"state", "config"} <= set(meta):
        raise CorruptCheckpointError(f"checkpoint {path}: meta.json lacks its state or config")
    return meta


def _rank(path: Path) -> tuple[int, int]:
    """Sort key, oldest first: (rollbacks, step); an unreadable meta.json sorts first."""
    try:
        rollbacks = int(read_meta(path)["state"].get("rollbacks", 0))
    except (CheckpointError, TypeError, ValueError):
        rollbacks = -1
    return rollbacks, step_of(path)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (all files present), oldest first by (rollbacks, step)."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith(PREFIX)
        and p.name[len(PREFIX) :].isdigit()
        and (p / "meta.json").is_file()
        and (is_sharded(p) or all((p / name).is_file() for name in TENSOR_FILES))
    ]
    return sorted(found, key=_rank)


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint is in the sharded layout (written by every rank, palm.saving)."""
    return (path / STATE / ".metadata").is_file()


def sharded_files(path: Path) -> tuple[str, ...]:
    """The files of a sharded checkpoint that its meta.json records a sha256 for."""
    return tuple(read_meta(path).get("sha256", {}))


def incomplete_checkpoints(root: Path) -> list[Path]:
    """`step_*` folders missing a file: never written by palm (its folders appear whole), so
    damage from outside, e.g. a deleted meta.json."""
    if not root.is_dir():
        return []
    complete = set(list_checkpoints(root))
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
        and p not in complete
    )  # fmt: skip


def verify_checkpoint(path: Path, files: tuple[str, ...] = TENSOR_FILES) -> dict[str, Any]:
    """The checkpoint's meta.json, after checking `files` against the sha256s it records."""
    with verifying(path, files) as meta:
        pass
    return meta


@contextmanager
def verifying(path: Path, files: tuple[str, ...] = TENSOR_FILES) -> Iterator[dict[str, Any]]:
    """Hash `files` in background threads (hashlib releases the GIL) while the block loads the
    checkpoint, and raise CorruptCheckpointError at its end if one does not match the sha256 in
    meta.json: the check then costs about max(0, hashing - loading), not hashing + loading.
    Yields the meta.json. Whatever the block restored from a corrupt checkpoint must be
    discarded by the caller (loading an older checkpoint over it does)."""
    meta = read_meta(path)
    recorded = meta.get("sha256", {})
    names = [name for name in files if name in recorded]  # format 1 recorded none

    def digest(name: str) -> str:
        try:
            return sha256_file(path / name)
        except OSError as error:
            raise CorruptCheckpointError(f"checkpoint {path}: {name}: {error}") from None

    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        pending = {name: pool.submit(digest, name) for name in names}
        yield meta
        for name, future in pending.items():
            if future.result() != recorded[name]:
                raise CorruptCheckpointError(
                    f"checkpoint {path}: {name} does not match the sha256 in its meta.json "
                    f"(damaged on disk or in transfer)"
                )


def _load_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path / name)
    except Exception as error:  # noqa: BLE001 (safetensors has its own error types)
        raise CorruptCheckpointError(f"checkpoint {path}: {name} is corrupt ({error})") from None


@dataclass
class LoadedCheckpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    state: TrainingState
    config: dict[str, Any]


def load_checkpoint(path: Path, verify: bool = True) -> LoadedCheckpoint:
    """Read a checkpoint folder (verified, unless the caller verifies around it with
    `verifying`); tensors come from safetensors, the rest from JSON."""
    if verify:
        meta = verify_checkpoint(path)
    else:
        meta = read_meta(path)
    model_state = _load_tensors(path, "model.safetensors")
    optimizer_tensors = _load_tensors(path, "optimizer.safetensors")
    try:
        return LoadedCheckpoint(
            path=path,
            model_state=model_state,
            optimizer_state=_unflatten_optimizer(optimizer_tensors, meta["optimizer"]),
            state=TrainingState(**meta["state"]),
            config=meta["config"],
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptCheckpointError(
            f"checkpoint {path}: meta.json is inconsistent ({error})"
        ) from None


def check_same_model(path: Path, saved: ModelConfig, current: ModelConfig) -> None:
    """Refuse to load weights of another model shape, naming the differing keys."""
    saved_values, current_values = saved.to_dict(), current.to_dict()
    differ = sorted(
        k for k in saved_values if saved_values[k] != current_values[k] and k != "dropout"
    )
    if differ:
        details = ", ".join(
            f"{k}: checkpoint {saved_values[k]!r} vs config {current_values[k]!r}" for k in differ
        )
        raise CheckpointError(
            f"checkpoint {path} is for another model ({details}); use the "
            f"matching model config or another run name (train.name=...)"
        )


def checkpoints_to_resume(root: Path, mode: str) -> list[Path]:
    """The checkpoints a run may continue from under train.resume `mode`, newest first ("auto":
    any; "must": at least one, else an error; "never": none, an error if one exists)."""
    checkpoints = list_checkpoints(root)
    if checkpoints and mode == "never":
        raise CheckpointError(
            f"{root} already holds checkpoints; resume it "
            f"(train.resume=auto) or choose another train.name"
        )
    if not checkpoints and mode == "must":
        raise CheckpointError(
            f"no complete checkpoint in {root} to resume; start a new run without --resume"
        )
    return checkpoints[::-1]


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints plus the one with the best validation loss."""
    checkpoints = list_checkpoints(root)
    best, best_loss = None, float("inf")
    for path in checkpoints:
        try:
            loss = read_meta(path)["state"].get("val_loss")
        except CheckpointError:
            continue
        if loss is not None and loss < best_loss:
            best, best_loss = path, loss
    for path in checkpoints[:-keep]:
        if path != best:
            discard(path)


def discard_after(root: Path, step: int) -> list[Path]:
    """Remove every checkpoint of a step after `step` (the abandoned ones after a rollback)."""
    abandoned = [p for p in list_checkpoints(root) if step_of(p) > step]
    for path in abandoned:
        discard(path)
    return abandoned


def set_aside(path: Path, why: str = "corrupt") -> Path:
    """Move a damaged checkpoint out of the `step_*` namespace, keeping it for inspection: it
    can then neither be resumed from nor be overwritten when training reaches its step again."""
    for n in range(1000):
        target = path.with_name(path.name + (f".{why}" if n == 0 else f".{why}-{n}"))
        if not target.exists():
            publish(path, target)
            return target
    raise CheckpointError(f"{path}: too many corrupt copies beside it; remove some")


def clean_stale(root: Path) -> list[Path]:
    """Remove temporary and trash folders that writers no longer running left in `root`."""
    leftovers = stale(root)
    for path in leftovers:
        remove(path)
    return leftovers
