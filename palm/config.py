"""Configuration: the model (PaLM §2, presets from Table 1) and a run's data, optimiser and loop
(PaLM §5), as frozen dataclasses loaded from YAML < `section.key=value` overrides.

Names follow the paper: `d_model`, `n_layers`, `n_heads`, `head_dim`, `ffn_mult`, `vocab_size`.
Every switch defaults to what PaLM does; the others exist to rerun the paper's ablations. Every
choice list lives here once; a bad key or value is a `ConfigError` naming the valid ones.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palm.errors import ConfigError

ACTIVATIONS = ("swiglu", "gelu")
OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("palm", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "float32", "bfloat16")
PARALLEL = ("none", "ddp", "fsdp")
RESUME = ("auto", "must", "never")
IGNORE_INDEX = -100  # a target id left out of the loss (padding); the loader and the loss agree
TOKENS_PER_MICRO_BATCH = 8192  # automatic micro-batch: about this many tokens per forward
_LR_POWER = re.compile(r"^\s*lr\s*\^\s*([0-9]*\.?[0-9]+)\s*$")


def _check_choice(where: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{where} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and architecture of a PaLM model (PaLM §2, Table 1)."""

    vocab_size: int = 32_000  # tokens in the vocabulary (the paper: 256k SentencePiece pieces)
    d_model: int = 512  # width of the residual stream
    n_layers: int = 8  # number of Transformer blocks
    n_heads: int = 8  # query heads; n_heads * head_dim need not equal d_model (540B: 48 x 256)
    head_dim: int = 64  # width of one attention head (the paper: 256 at every size)
    ffn_mult: float = 4.0  # MLP hidden width = ffn_mult * d_model (the paper: 4)
    max_seq_len: int = 2048  # longest context the model is used with (sizes the key/value cache)
    rope_base: float = 10_000.0  # RoPE wavelength base (Su et al.; PaLM §2 "RoPE embeddings")
    norm_eps: float = 1e-5  # LayerNorm epsilon
    # Pre-softmax logits times 1/sqrt(d_model) with the shared N(0, 1) embedding (PaLM §5; an
    # untied head is fan-in initialised and never scaled); False for peers that do not scale.
    scale_logits: bool = True
    # xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer"): RoPE with queries scaled by
    # zeta^(n/gamma) and keys by zeta^(-n/gamma), gamma = this value in positions; 0 = plain RoPE
    # (PaLM). Converted palm-rlhf-pytorch models (conceptofmind's checkpoints) use 512.
    xpos_scale_base: float = 0.0
    # Final LayerNorm before the output projection (PaLM and every peer apply it); False only for
    # checkpoints trained without it (palm-rlhf-pytorch <= 0.2.0 skipped it by mistake).
    final_norm: bool = True
    # --- ablation switches; defaults are PaLM's ---
    parallel_block: bool = True  # y = x + MLP(LN(x)) + Attn(LN(x)); False: the serial block
    multi_query: bool = True  # one shared key/value head; False: one per query head
    activation: str = "swiglu"  # "swiglu" (three matrices) or "gelu" (two matrices)
    tie_embeddings: bool = True  # output projection = input embedding (PaLM §2)
    dropout: float = 0.0  # residual dropout; 0 in pre-training, 0.1 for fine-tuning (PaLM §5)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if self.ffn_mult <= 0 or self.ffn_hidden != self.ffn_mult * self.d_model:
            raise ConfigError(
                f"model.ffn_mult * model.d_model must be a positive integer, got "
                f"{self.ffn_mult} * {self.d_model}"
            )
        _check_choice("model.activation", self.activation, ACTIVATIONS)
        if self.xpos_scale_base < 0:
            raise ConfigError(
                f"model.xpos_scale_base must be >= 0 (0 = plain RoPE), got {self.xpos_scale_base}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def ffn_hidden(self) -> int:
        """MLP hidden width (the paper's d_ff)."""
        return int(self.ffn_mult * self.d_model)

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads: 1 under multi-query attention (PaLM §2), else one per query head."""
        return 1 if self.multi_query else self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see PRESETS), optionally with some fields replaced."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a mapping (e.g. YAML); a `preset` key is the base, unknown keys are errors."""
        return _section("model", cls, values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _paper(n_layers: int, n_heads: int, d_model: int) -> ModelConfig:
    # PaLM Table 1: head size 256, d_ff = 4 d_model, 256k vocabulary, sequence length 2048.
    return ModelConfig(256_000, d_model, n_layers, n_heads, head_dim=256, max_seq_len=2048)


def _small(vocab: int, d_model: int, n_layers: int, n_heads: int, head_dim: int, seq: int):
    return ModelConfig(vocab, d_model, n_layers, n_heads, head_dim, max_seq_len=seq)


# Parameter counts (tied embeddings): `palm info --preset NAME`; the README lists them.
PRESETS: dict[str, ModelConfig] = {
    # Table 1 of the paper: 8.63B, 62.50B, 540.35B parameters.
    "palm-8b": _paper(32, 16, 4096),
    "palm-62b": _paper(64, 32, 8192),
    "palm-540b": _paper(118, 48, 18432),
    # Small presets for CPUs and single GPUs (vocabulary is replaced by the data's at training).
    #                    vocab  d_model layers heads head_dim max_seq_len
    "palm-tiny": _small(8192, 128, 4, 4, 32, 256),
    "palm-s": _small(8192, 256, 4, 4, 64, 256),
    "palm-m": _small(32_000, 512, 8, 8, 64, 512),
    "palm-150m": _small(32_000, 768, 12, 12, 64, 1024),
    "palm-350m": _small(32_000, 1024, 24, 16, 64, 2048),
    "palm-1b": _small(32_000, 2048, 16, 8, 256, 2048),
}


@dataclass(frozen=True)
class DataConfig:
    """Where the prepared data is and how it is batched."""

    path: str = "data/wikitext-103"  # dataset folder written by download.py (has meta.json)
    seq_len: int = 0  # tokens per training sequence; 0 = the manifest's (download --seq_len)
    batch_size: int = 0  # global batch in sequences per optimizer step; 0 = the manifest's
    micro_batch_size: int = 0  # sequences per forward/backward on one rank; 0 = whole batch
    seed: int = 1234  # order of the training windows (each epoch is a permutation of it)

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "micro_batch_size"):
            if (value := getattr(self, name)) < 0:
                raise ConfigError(f"data.{name} must be >= 0 (0 = default), got {value}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedules; defaults are PaLM §5."""

    name: str = "adafactor"  # "adafactor" (PaLM: unfactorised, parameter-scaled) or "adamw"
    schedule: str = "palm"  # "palm": lr constant then 1/sqrt(k); "cosine"; "constant"
    lr: float = 1e-2  # peak learning rate (PaLM: 1e-2)
    constant_steps: int = 10_000  # "palm": steps at the peak before the 1/sqrt(k) decay
    warmup_steps: int = 0  # "cosine"/"constant": linear warm-up steps
    min_lr_ratio: float = 0.1  # "cosine": final lr as a fraction of the peak
    beta1: float = 0.9  # first-moment decay (PaLM: 0.9)
    beta2: float = 0.95  # AdamW only; Adafactor uses beta2_k = 1 - k^-0.8 (PaLM §5)
    # Adafactor: "lr^2" (PaLM: lr^2 of the parameter per step) or a number; AdamW: a number.
    # Kept as written (numbers as strings), so saved configs show what the user gave.
    weight_decay: str = "lr^2"
    grad_clip: float = 1.0  # global gradient-norm clipping (PaLM: 1.0); 0 disables
    batch_ramp: bool = False  # PaLM's 1/4 -> 1/2 -> full batch ramp (§5), scaled to max_steps

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, OPTIMIZERS)
        _check_choice("optim.schedule", self.schedule, SCHEDULES)
        if self.lr <= 0 or self.grad_clip < 0:
            raise ConfigError("optim.lr must be > 0 and optim.grad_clip >= 0")
        try:
            parse_weight_decay(self.weight_decay)
        except ConfigError as error:
            raise ConfigError(f"optim.{error}") from None
        if self.name == "adamw" and _LR_POWER.match(str(self.weight_decay)):
            raise ConfigError(
                f"optim.weight_decay {self.weight_decay!r} is Adafactor's (PaLM §5); give AdamW "
                f"a number, e.g. optim.weight_decay=0.1"
            )


def parse_weight_decay(value: str | float) -> tuple[float, float]:
    """'lr^P' -> (1.0, P); a number w in [0, 1) -> (w, 0.0). The per-step decay rate is then
    w * lr^P (T5X's form; PaLM §5: 'lr^2')."""
    match = _LR_POWER.match(value) if isinstance(value, str) else None
    if match is not None:
        return 1.0, float(match.group(1))
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"weight_decay must be a number or 'lr^<power>' (e.g. 'lr^2'), got {value!r}"
        ) from None
    if not 0.0 <= number < 1.0:
        raise ConfigError(f"weight_decay must be in [0, 1), got {number}")
    return number, 0.0


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, logging, evaluation, checkpoints, precision."""

    max_steps: int = 10_000  # optimizer steps
    max_minutes: float = 0.0  # stop (with a checkpoint) after this wall time; 0 = no limit
    seed: int = 0  # model initialisation and dropout
    z_loss: float = 1e-4  # z-loss coefficient (PaLM §5)
    device: str = "auto"  # "auto" = cuda if available, else cpu
    precision: str = "auto"  # "auto" = bfloat16 autocast on GPU, float32 on CPU
    compile: bool = False  # torch.compile the model and PaLM Adafactor's update
    activation_checkpointing: bool = False  # recompute block activations in backward (PaLM §4)
    parallel: str = "none"  # data parallelism under torchrun: "ddp" or "fsdp"
    meta_init: bool = False  # fsdp: build on the meta device, initialise each rank's shard only
    tensor_parallel: int = 1  # ranks splitting each layer (PaLM §4 model parallelism); 1 = none
    async_checkpoint: bool = False  # sharded checkpoints: write in the background (dcp.async_save)
    runs_dir: str = "runs"  # run folders are runs/<name>/
    name: str = "default"  # run name
    # "auto": continue the latest complete checkpoint of runs/<name>/ if there is one;
    # "must": continue it, error if none (--resume); "never": error if one exists.
    resume: str = "auto"
    # Fine-tuning: start from the weights of this checkpoint or run folder (e.g. a converted
    # pretrained model); the model shape comes from it, the optimizer starts fresh.
    init_from: str = ""
    log_every: int = 10  # steps between metric lines
    eval_every: int = 500  # steps between validation evaluations (0 = only at the end)
    eval_batches: int = 20  # validation batches per evaluation
    checkpoint_every: int = 500  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 3  # most recent checkpoints kept (plus the best by validation loss)
    # Loss spikes (PaLM §5.1): a loss above mean + spike_sigma * std of the last spike_window
    # steps (and spike_ratio x the mean) rolls back to a checkpoint about rollback_steps earlier
    # and skips skip_batches batches. Non-finite losses are never applied.
    spike_detection: bool = True
    spike_window: int = 100
    spike_sigma: float = 6.0
    spike_ratio: float = 1.5
    rollback_steps: int = 100
    skip_batches: int = 200
    max_rollbacks: int = 20  # give up (error) after this many rollbacks in one run
    sample_tokens: int = 64  # tokens sampled at the end of the run (0 = none)
    sample_prompt: str = ""  # prompt of that sample ("" = start of a document)
    sample_temperature: float = 0.8  # its sampling temperature (0 = greedy)
    sample_top_k: int = 40  # its top-k filter (0 = none)

    def __post_init__(self) -> None:
        _check_choice("train.device", self.device, DEVICES)
        _check_choice("train.precision", self.precision, PRECISIONS)
        _check_choice("train.parallel", self.parallel, PARALLEL)
        _check_choice("train.resume", self.resume, RESUME)
        if self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.max_steps}")
        for name in (
            "log_every",
            "keep_checkpoints",
            "eval_batches",
            "spike_window",
            "tensor_parallel",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not self.name or "/" in self.name:
            raise ConfigError(f"train.name must be a plain folder name, got {self.name!r}")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


@dataclass(frozen=True)
class Config:
    """Everything a run needs; saved with the run and with every checkpoint."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def resolved(self, vocab_size: int, seq_len: int, batch_size: int, world_size: int) -> Config:
        """What the prepared data decides filled in: the vocabulary (always the data's, unless
        fine-tuning from a checkpoint), and seq_len / batch size where the config leaves them 0
        (the manifest's defaults); the micro-batch where 0 (see `auto_micro_batch`)."""
        data = self.data
        seq_len, batch = data.seq_len or seq_len, data.batch_size or batch_size
        if batch % world_size:
            raise ConfigError(f"data.batch_size {batch} is not divisible by the {world_size} ranks")
        micro = data.micro_batch_size or auto_micro_batch(batch // world_size, seq_len)
        vocab = self.model.vocab_size if self.train.init_from else vocab_size
        max_len = max(self.model.max_seq_len, seq_len)
        model = dataclasses.replace(self.model, vocab_size=vocab, max_seq_len=max_len)
        data = dataclasses.replace(data, seq_len=seq_len, batch_size=batch, micro_batch_size=micro)
        return dataclasses.replace(self, model=model, data=data)


def auto_micro_batch(per_rank_batch: int, seq_len: int) -> int:
    """Largest divisor of the per-rank batch with at most ~TOKENS_PER_MICRO_BATCH tokens."""
    limit = max(1, TOKENS_PER_MICRO_BATCH // seq_len)
    return max(d for d in range(1, per_rank_batch + 1) if per_rank_batch % d == 0 and d <= limit)


_ACCEPTS = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str, int, float)}


def _coerce(section: str, field: dataclasses.Field, value: Any) -> Any:
    """Check a value against the field's declared type; ints are accepted for floats, and
    numbers for strings (kept as written). A bool is never taken for a number or the reverse."""
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    if kind not in _ACCEPTS:
        return value
    if isinstance(value, _ACCEPTS[kind]) and (kind == "bool") == isinstance(value, bool):
        return {"float": float, "str": str}.get(kind, lambda v: v)(value)
    raise ConfigError(f"{section}.{field.name} must be a {kind}, got {value!r}")


def build_config(values: dict[str, Any]) -> Config:
    """A Config from nested mappings {section: {key: value}}; unknown keys are errors."""
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    return Config(**{name: _section(name, cls, values.get(name)) for name, cls in SECTIONS.items()})


def _section(name: str, cls: type, given: Any) -> Any:
    """One section's dataclass from a mapping: every key known, every value of its field's type;
    for the model, a `preset` key names the base the other keys replace."""
    if not isinstance(given or {}, dict):
        raise ConfigError(f"config section {name!r} must be a mapping")
    given = dict(given or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    base = (
        ModelConfig.preset(given.pop("preset")) if name == "model" and "preset" in given else cls()
    )
    bad = sorted(set(given) - set(fields))
    if bad:
        extra = "preset, " if name == "model" else ""
        raise ConfigError(
            f"unknown {name} key(s) {[f'{name}.{k}' for k in bad]}; valid {name} keys: "
            f"{extra}{', '.join(sorted(fields))}"
        )
    return dataclasses.replace(base, **{k: _coerce(name, fields[k], v) for k, v in given.items()})


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """`section.key=value` strings to nested mappings; values are parsed as YAML scalars."""
    import yaml

    nested: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise ConfigError(
                f"override {item!r} must look like section.key=value, e.g. train.max_steps=200"
            )
        value = yaml.safe_load(raw) if raw else ""
        nested.setdefault(section, {})[field] = value
    return nested


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping; a missing or malformed file is a ConfigError."""
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist (see configs/ for examples)"
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold sections model/data/optim/train")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file < `key=value` overrides; every key checked."""
    values = read_yaml(path) if path is not None else {}
    for section, given in parse_overrides(overrides or []).items():
        existing = values.setdefault(section, {})
        if not isinstance(existing, dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        existing.update(given)
    return build_config(values)


def load_model_config(path: str | Path) -> ModelConfig:
    """The model section of a YAML config file (or a file holding model keys only)."""
    values = read_yaml(path)
    try:
        return ModelConfig.from_dict(values.get("model", values))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path}: {error}") from None
