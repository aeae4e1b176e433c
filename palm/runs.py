"""Run folders: what `runs/<name>/` holds, and the one road from a checkpoint or a run folder
to a model, used by generation, evaluation, fine-tuning and export.

A run folder holds the resolved `config.yaml`, the tokenizer its data was encoded with, its
metrics and `checkpoints/`. Given a run folder, the best (lowest validation loss) or latest
checkpoint is used, skipping any that fails verification, with a warning; an explicitly named
checkpoint folder that fails is an error. Fine-tuning (train.init_from) also starts from a
transformers folder that `palm export --to hf` wrote (palm.hf).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from palm import hf
from palm.checkpoint import list_checkpoints, read_meta
from palm.config import Config, build_config
from palm.data.manifest import load_manifest
from palm.distributed import pick_device
from palm.errors import CheckpointError, ConfigError, CorruptCheckpointError, DataError, warn
from palm.files import write_atomic
from palm.model import PaLM
from palm.saving import load_checkpoint_weights
from palm.tokenizer import Tokenizer

WHICH = ("best", "latest")  # which checkpoint of a run folder to load
# palm's own tokenizer file in a transformers folder: the SentencePiece original, else the JSON
HF_TOKENIZERS = ("tokenizer.model", "tokenizer.json")


def is_checkpoint(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and (path / "meta.json").is_file()


def resolve_checkpoints(path: str | Path, which: str = "best") -> list[Path]:
    """The checkpoint folders `path` names, in order of preference: itself, or a run folder's
    checkpoints, best (lowest validation loss, then newest) or latest first."""
    if which not in WHICH:
        raise ConfigError(f"which must be one of {WHICH}, got {which!r}")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such checkpoint or run folder; pass "
            f"runs/<name> or runs/<name>/checkpoints/step_NNNNNNNN"
        )
    if is_checkpoint(path):
        return [path]
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = list_checkpoints(root)[::-1]  # newest first
    if not found:
        raise CheckpointError(
            f"{path}: holds no complete checkpoint (step_*/ with "
            f"model.safetensors, optimizer.safetensors and meta.json); "
            f"train first or pass a checkpoint folder"
        )
    if which == "latest":
        return found

    def val_loss(p: Path) -> float:
        try:
            loss = read_meta(p)["state"].get("val_loss")
        except CheckpointError:
            return float("inf")
        return float("inf") if loss is None else float(loss)

    # Without any evaluated checkpoint "best" cannot be decided; newest first is the honest pick.
    return sorted(found, key=val_loss)  # stable: equal losses keep newest first


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    return resolve_checkpoints(path, which)[0]


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
    except (CheckpointError, KeyError, TypeError):
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
    candidates = resolve_checkpoints(path, which)
    for checkpoint in candidates:
        try:
            config = saved_config(checkpoint)
            weights = load_checkpoint_weights(checkpoint)
            break
        except CorruptCheckpointError as error:
            if len(candidates) == 1:
                raise
            warn(f"{error}; skipped (kept on disk), trying an older one")
    else:
        raise CheckpointError(f"{path}: every checkpoint fails verification (see the warnings)")
    model = PaLM(config.model)
    try:  # strict: missing, unexpected or differently shaped tensors are all refused
        model.load_state_dict(weights)
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


def init_from(config: Config) -> Config:
    """For train.init_from (fine-tuning): the run config with that checkpoint's model shape
    (dropout stays the run's), after checking that the data was tokenized with its tokenizer.
    A transformers CohereForCausalLM folder (`palm export --to hf`) works too."""
    source = Path(config.train.init_from)
    if hf.is_hf_folder(source):
        path, shape = source, hf.read_config(source)
        tokenizer = next((source / n for n in HF_TOKENIZERS if (source / n).is_file()), None)
    else:
        path = resolve_checkpoint(source, "latest")
        shape, tokenizer = saved_config(path).model, find_tokenizer(path)
    data_tokenizer = Path(config.data.path) / "tokenizer.model"
    if tokenizer is not None and data_tokenizer.is_file():
        if tokenizer.read_bytes() != data_tokenizer.read_bytes():
            raise DataError(
                f"{config.data.path} was tokenized with another tokenizer than "
                f"{config.train.init_from} ({tokenizer}); prepare the data "
                f"with it: download.py --tokenizer {tokenizer} ..."
            )
    model = dataclasses.replace(shape, dropout=config.model.dropout)
    return dataclasses.replace(config, model=model)


def init_weights(path: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights train.init_from names (checkpoint, run or transformers folder), ours."""
    if hf.is_hf_folder(path):
        return Path(path), hf.read_folder(path)[1]
    checkpoint = resolve_checkpoint(path, "latest")
    return checkpoint, load_checkpoint_weights(checkpoint)


def resolve_run(config: Config, world_size: int) -> tuple[Config, str | None]:
    """The config of a training run with what its data decides (vocabulary, seq_len, batch)
    and, for train.init_from, that checkpoint's model shape; plus a note when the configured
    vocabulary was replaced."""
    manifest = load_manifest(config.data.path)
    if config.train.init_from:
        config = init_from(config)
    resolved = config.resolved(
        manifest.vocab_size, manifest.seq_len, manifest.batch_size, world_size
    )
    if resolved.model.vocab_size == config.model.vocab_size:
        return resolved, None
    return resolved, (
        f"note: model.vocab_size {config.model.vocab_size} replaced by the data's "
        f"{manifest.vocab_size} (the vocabulary always comes from the data)"
    )


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
