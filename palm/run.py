"""Setting up a run: device and precision, the prepared data, the resolved config, the run folder.

Kept apart from the loop so that `trainer.py` reads as the recipe and this file as the plumbing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from palm.config import Config, weight_decay_value
from palm.distributed import Distributed, wrap_model
from palm.model import PaLM
from palm.optim import build_optimizer

TOKENS_PER_MICRO_BATCH = 8192  # automatic micro-batch: about this many tokens per forward


@dataclass
class RunSetup:
    config: Config  # resolved: vocabulary, seq_len, batch and micro-batch filled in
    device: torch.device
    precision: str  # "float32" or "bfloat16"
    run_dir: Path
    train: Any  # palm.data.TokenWindows over the training split
    valid: Any | None  # ... over the validation split, if the data has one
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rank_indices(self, first_sample: int, global_batch: int) -> np.ndarray:
        from palm.data import rank_sample_indices

        return rank_sample_indices(first_sample, global_batch, self.rank, self.world_size)

    def progress(self, initial: int, total: int):
        from tqdm import tqdm

        # A bar on terminals only; logs and CI get the metric lines instead.
        return tqdm(
            initial=initial,
            total=total,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.is_main and sys.stderr.isatty()),
        )


def pick_device(name: str, option: str = "train.device") -> torch.device:
    """ "auto" = CUDA if available, else the CPU; an unavailable device is an error naming
    `option`, the setting the user gave it with."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{option}={name} but this torch build sees no CUDA GPU; use auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option}=mps but MPS is not available; use cpu")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """bf16 autocast on GPUs, float32 on CPUs (PaLM trained in bf16 on TPUs)."""
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if name == "bfloat16" and device.type != "cuda":
        raise ValueError(
            f"train.precision=bfloat16 is only supported on CUDA here, not on "
            f"{device.type}; use train.precision=float32"
        )
    return name


def auto_micro_batch(per_rank_batch: int, seq_len: int) -> int:
    """Largest divisor of the per-rank batch with at most ~TOKENS_PER_MICRO_BATCH tokens."""
    limit = max(1, TOKENS_PER_MICRO_BATCH // seq_len)
    return max(d for d in range(1, per_rank_batch + 1) if per_rank_batch % d == 0 and d <= limit)


def resolve_config(config: Config, manifest: Any, world_size: int) -> Config:
    """Fill in what the data decides: vocabulary, seq_len, batch size and micro-batch."""
    data = config.data
    seq_len = data.seq_len or manifest.seq_len
    batch = data.batch_size or manifest.batch_size
    if batch % world_size:
        raise ValueError(f"data.batch_size {batch} is not divisible by the {world_size} ranks")
    micro = data.micro_batch_size or auto_micro_batch(batch // world_size, seq_len)
    vocab = config.model.vocab_size if config.train.init_from else manifest.vocab_size
    model = dataclasses.replace(
        config.model, vocab_size=vocab, max_seq_len=max(config.model.max_seq_len, seq_len)
    )
    if config.model.vocab_size != vocab:
        print(
            f"note: model.vocab_size {config.model.vocab_size} replaced by the data's "
            f"{manifest.vocab_size} (the vocabulary always comes from the data)"
        )
    data = dataclasses.replace(data, seq_len=seq_len, batch_size=batch, micro_batch_size=micro)
    return dataclasses.replace(config, model=model, data=data)


def write_atomic(path: Path, text: str) -> None:
    write_atomic_bytes(path, text.encode("utf-8"))


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def prepare_run_dir(config: Config) -> Path:
    """runs/<name>/, created and checked writable (every rank checks: they may not share a disk)."""
    run_dir = Path(config.train.runs_dir) / config.train.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ValueError(
            f"run folder {run_dir} is not writable ({error.strerror}); choose "
            f"another with train.runs_dir=... or fix its permissions"
        ) from None
    return run_dir


def model_from_checkpoint(config: Config) -> tuple[Config, Path | None]:
    """For train.init_from: the model shape of that checkpoint (dropout stays the run's)."""
    from palm.checkpoint import read_meta
    from palm.config import ModelConfig
    from palm.inference import find_tokenizer, resolve_checkpoint

    path = resolve_checkpoint(config.train.init_from, "latest")
    saved = ModelConfig.from_dict(read_meta(path)["config"]["model"])
    model = dataclasses.replace(saved, dropout=config.model.dropout)
    return dataclasses.replace(config, model=model), find_tokenizer(path)


def prepare_run(config: Config, ctx: Distributed) -> RunSetup:
    from palm.data import TokenWindows, load_manifest

    rank, world_size = ctx.rank, ctx.world_size
    device = ctx.device(pick_device(config.train.device).type)
    precision = pick_precision(config.train.precision, device)
    manifest = load_manifest(config.data.path)
    init_tokenizer = None
    if config.train.init_from:
        config, init_tokenizer = model_from_checkpoint(config)
    config = resolve_config(config, manifest, world_size)
    run_dir = prepare_run_dir(config)
    if ctx.is_main:
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    train = TokenWindows(config.data.path, "train", config.data.seq_len, config.data.seed)
    tokenizer = Path(config.data.path) / "tokenizer.model"
    tokenizer_sha256 = None
    if tokenizer.is_file():
        blob = tokenizer.read_bytes()
        tokenizer_sha256 = hashlib.sha256(blob).hexdigest()
        if ctx.is_main:  # the run carries its tokenizer, so generate.py needs nothing else
            write_atomic_bytes(run_dir / "tokenizer.model", blob)
    if init_tokenizer is not None and tokenizer_sha256 is not None:
        wanted = hashlib.sha256(init_tokenizer.read_bytes()).hexdigest()
        if wanted != tokenizer_sha256:
            raise ValueError(
                f"{config.data.path} was tokenized with another tokenizer than "
                f"{config.train.init_from} ({init_tokenizer}); prepare the data "
                f"with it: download.py --tokenizer {init_tokenizer} ..."
            )
    train.check_compatible(tokenizer_sha256, config.model.vocab_size)
    valid = None
    if (
        "validation" in manifest.splits
        and manifest.splits["validation"]["n_tokens"] > config.data.seq_len
    ):
        valid = TokenWindows(config.data.path, "validation", config.data.seq_len, config.data.seed)
    return RunSetup(config, device, precision, run_dir, train, valid, rank, world_size)


def build_model(config: Config, ctx: Distributed, device: torch.device) -> PaLM:
    """The model on its device. Under FSDP with train.meta_init, built on the meta device and
    materialised shard by shard, so a model larger than one rank's memory can be built."""
    if ctx.parallel == "fsdp" and config.train.meta_init:
        with torch.device("meta"):
            model = PaLM(config.model)
        wrap_model(model, ctx, device)  # shards the (empty) parameters
        model.to_empty(device=device)
        model.reset_parameters()  # PaLM §5 init, drawn per shard
    else:
        model = PaLM(config.model).to(device)
        if ctx.parallel == "fsdp":
            wrap_model(model, ctx, device)  # shards in place
    if config.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def clip_gradients(params: list[Tensor], max_norm: float) -> float:
    """Global gradient-norm clipping (PaLM §5: 1.0); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def make_optimizer(config: Config, model: PaLM) -> torch.optim.Optimizer:
    o = config.optim
    if o.name == "adafactor":
        return build_optimizer(
            "adafactor",
            model.parameters(),
            lr=o.lr,
            beta1=o.beta1,
            weight_decay=weight_decay_value(o.weight_decay),
        )
    decay = weight_decay_value(o.weight_decay)
    if decay == "lr^2":
        raise ValueError(
            "optim.weight_decay 'lr^2' is Adafactor's (PaLM §5); give AdamW a "
            "number, e.g. optim.weight_decay=0.1"
        )
    return build_optimizer(
        "adamw", model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=decay
    )


def enable_activation_checkpointing(model: PaLM) -> None:
    """Recompute each block's activations during backward instead of storing them."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        plain = block.forward

        def forward(*args, _plain=plain, **kwargs):
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        block.forward = forward
