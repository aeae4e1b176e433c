"""Checkpoints and run folders: the only place that saves or loads them.

A checkpoint is a folder `runs/<name>/checkpoints/step_00001000/` holding `model.safetensors`
(the weights, tied embedding stored once), `optimizer.safetensors` and `meta.json` (step, data
position, RNG states, optimizer hyperparameters, the resolved config, validation loss); plain
safetensors and JSON, so loading never unpickles anything. It is written into a temporary
folder, fsynced and renamed last, so a crash (even `kill -9`) never leaves one that looks
complete. `load_model` is the one road from a checkpoint (or run folder) to a model, used by
generation, evaluation, fine-tuning and export.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from palm.config import Config, ModelConfig, build_config
from palm.distributed import pick_device
from palm.errors import CheckpointError, ConfigError, DataError
from palm.files import fsync_dir, fsync_file, publish, temporary_path, write_atomic
from palm.model import PaLM
from palm.tokenizer import Tokenizer

PREFIX = "step_"
FILES = ("model.safetensors", "optimizer.safetensors", "meta.json")
WHICH = ("best", "latest")  # which checkpoint of a run folder to load


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
    tmp = temporary_path(final)
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
            fsync_file(tmp / name)
        fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step from before a rollback
            shutil.rmtree(final)
        publish(tmp, final)
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


def checkpoint_to_resume(root: Path, mode: str) -> Path | None:
    """The checkpoint a run continues from under train.resume `mode` ("auto": the latest if
    any; "must": the latest, an error if none; "never": none, an error if one exists)."""
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
    return checkpoints[-1] if checkpoints else None


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
            f"{path / 'model.safetensors'} is corrupt ({error}); use another checkpoint "
            f"(--which latest, or a step_* folder)"
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


# --- from a checkpoint to a model -------------------------------------------------------------


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """The checkpoint folder that `path` names: itself, or the best (lowest validation loss) or
    latest (highest step) complete checkpoint of a run folder."""
    if which not in WHICH:
        raise ConfigError(f"which must be one of {WHICH}, got {which!r}")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such checkpoint or run folder; pass "
            f"runs/<name> or runs/<name>/checkpoints/step_NNNNNNNN"
        )
    if (path / "model.safetensors").is_file() and (path / "meta.json").is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = list_checkpoints(root)
    if not found:
        raise CheckpointError(
            f"{path}: holds no complete checkpoint (step_*/ with "
            f"model.safetensors, optimizer.safetensors and meta.json); "
            f"train first or pass a checkpoint folder"
        )
    if which == "latest":
        return found[-1]
    scored = [(read_meta(p)["state"].get("val_loss"), p) for p in found]
    scored = [(loss, p) for loss, p in scored if loss is not None]
    # Without any evaluated checkpoint "best" cannot be decided; the latest is the honest pick.
    return min(scored, key=lambda item: item[0])[1] if scored else found[-1]


def saved_config(checkpoint: Path) -> Config:
    """The resolved run config a checkpoint was saved with."""
    try:
        return build_config(read_meta(checkpoint)["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{checkpoint / 'meta.json'}: its config is unusable ({error}); "
            f"was it written by this version of palm?"
        ) from None


def find_tokenizer(checkpoint: Path, explicit: str | Path | None = None) -> Path | None:
    """The tokenizer.model next to the checkpoint, in its run folder, or the data folder."""
    if explicit is not None:
        return Path(explicit)
    candidates = [
        checkpoint / "tokenizer.model",
        checkpoint.parent / "tokenizer.model",
        checkpoint.parent.parent / "tokenizer.model",
    ]
    try:
        candidates.append(Path(read_meta(checkpoint)["config"]["data"]["path"]) / "tokenizer.model")
    except (KeyError, TypeError):
        pass
    return next((c for c in candidates if c.is_file()), None)


@dataclass
class LoadedModel:
    model: PaLM  # in eval mode, on the requested device
    tokenizer: Tokenizer | None  # None only when no tokenizer.model could be found
    config: Config  # the resolved run config saved with the checkpoint
    path: Path  # the checkpoint folder actually loaded
    step: int
    val_loss: float | None


def load_model(
    path: str | Path,
    which: str = "best",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tokenizer: str | Path | None = None,
    require_tokenizer: bool = True,
) -> LoadedModel:
    """Build the model from the checkpoint's saved config and load its weights (strictly)."""
    checkpoint = resolve_checkpoint(path, which)
    config = saved_config(checkpoint)
    model = PaLM(config.model)
    try:  # strict: missing, unexpected or differently shaped tensors are all refused
        model.load_state_dict(load_checkpoint_weights(checkpoint))
    except RuntimeError as error:
        detail = " ".join(str(error).split("\n\t")[1:3]) or str(error)
        raise CheckpointError(
            f"{checkpoint / 'model.safetensors'} does not match its saved config ({detail[:300]})"
        ) from None
    if isinstance(device, str):
        device = pick_device(device, "--device")
    model.to(device=device, dtype=dtype).eval()
    tok_path = find_tokenizer(checkpoint, tokenizer)
    if tok_path is None and require_tokenizer:
        raise CheckpointError(
            f"{checkpoint}: no tokenizer.model in it, its run folder or its "
            f"data folder; pass --tokenizer PATH"
        )
    tok = Tokenizer.load(tok_path) if tok_path is not None else None
    if tok is not None and tok.vocab_size > config.model.vocab_size:
        raise CheckpointError(
            f"{tok_path}: {tok.vocab_size} pieces, but the model has only "
            f"{config.model.vocab_size}; pass the run's own --tokenizer"
        )
    state = read_meta(checkpoint).get("state", {})
    return LoadedModel(
        model, tok, config, checkpoint, int(state.get("step", 0)), state.get("val_loss")
    )


# --- run folders ------------------------------------------------------------------------------


def init_from(config: Config) -> Config:
    """For train.init_from (fine-tuning): the run config with that checkpoint's model shape
    (dropout stays the run's), after checking that the data was tokenized with its tokenizer."""
    path = resolve_checkpoint(config.train.init_from, "latest")
    tokenizer, data_tokenizer = find_tokenizer(path), Path(config.data.path) / "tokenizer.model"
    if tokenizer is not None and data_tokenizer.is_file():
        if tokenizer.read_bytes() != data_tokenizer.read_bytes():
            raise DataError(
                f"{config.data.path} was tokenized with another tokenizer than "
                f"{config.train.init_from} ({tokenizer}); prepare the data "
                f"with it: download.py --tokenizer {tokenizer} ..."
            )
    model = dataclasses.replace(saved_config(path).model, dropout=config.model.dropout)
    return dataclasses.replace(config, model=model)


def prepare_run_dir(config: Config, is_main: bool) -> tuple[Path, str | None]:
    """runs/<name>/, checked writable (on every rank: they may not share a disk); rank 0 writes
    the resolved config.yaml and a copy of the data's tokenizer, so generate.py needs nothing
    else. Returns the folder and the tokenizer's sha256 (None when the data has none)."""
    run_dir = Path(config.train.runs_dir) / config.train.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"run folder {run_dir} is not writable ({error.strerror}); choose "
            f"another with train.runs_dir=... or fix its permissions"
        ) from None
    tokenizer = Path(config.data.path) / "tokenizer.model"
    blob = tokenizer.read_bytes() if tokenizer.is_file() else None
    if is_main:
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        if blob is not None:
            write_atomic(run_dir / "tokenizer.model", blob)
    return run_dir, None if blob is None else hashlib.sha256(blob).hexdigest()
