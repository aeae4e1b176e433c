"""Load a trained model for inference: a checkpoint folder or a run folder, plus its tokenizer.

Only safetensors and JSON are read (never pickle), so loading an untrusted checkpoint cannot
run code. A run folder (`runs/<name>/`) resolves to its best checkpoint (lowest validation
loss) or its latest (highest step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from palm.checkpoint import CheckpointError, list_checkpoints, read_meta
from palm.config import Config, build_config
from palm.model import PaLM
from palm.run import pick_device
from palm.tokenizer import Tokenizer

WHICH = ("best", "latest")


@dataclass
class LoadedModel:
    model: PaLM  # in eval mode, on the requested device
    tokenizer: Tokenizer | None  # None only when no tokenizer.model could be found
    config: Config  # the resolved run config saved with the checkpoint
    path: Path  # the checkpoint folder actually loaded
    step: int
    val_loss: float | None


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """The checkpoint folder that `path` names: itself, or the best/latest one of a run folder."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
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
        data_path = read_meta(checkpoint)["config"]["data"]["path"]
        candidates.append(Path(data_path) / "tokenizer.model")
    except (KeyError, TypeError):
        pass
    return next((c for c in candidates if c.is_file()), None)


def load_model_for_inference(
    path: str | Path,
    which: str = "best",
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    tokenizer: str | Path | None = None,
    require_tokenizer: bool = True,
) -> LoadedModel:
    """Build the model from the checkpoint's saved config and load its weights (strictly)."""
    checkpoint = resolve_checkpoint(path, which)
    meta = read_meta(checkpoint)
    try:
        config = build_config(meta["config"])
    except (KeyError, ValueError) as error:
        raise CheckpointError(
            f"{checkpoint / 'meta.json'}: its config is unusable ({error}); "
            f"was it written by this version of palm?"
        ) from None
    try:
        state = load_file(checkpoint / "model.safetensors")
    except Exception as error:  # noqa: BLE001 (safetensors has its own error types)
        raise CheckpointError(
            f"{checkpoint / 'model.safetensors'} is corrupt ({error}); use "
            f"another checkpoint (--which latest, or a step_* folder)"
        ) from None
    # A compiled model's state dict may carry torch.compile's prefix; the weights are the same.
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    model = PaLM(config.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint / 'model.safetensors'} does not match its saved "
            f"config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.to(
        device=pick_device(device, "--device") if isinstance(device, str) else device, dtype=dtype
    )
    model.eval()
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
    state_meta = meta.get("state", {})
    return LoadedModel(
        model, tok, config, checkpoint, int(state_meta.get("step", 0)), state_meta.get("val_loss")
    )
