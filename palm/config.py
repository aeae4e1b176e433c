"""Model configuration: one frozen dataclass, the paper's presets (PaLM Table 1) and small ones.

Names follow the paper: `d_model`, `n_layers`, `n_heads`, `head_dim`, `ffn_mult`, `vocab_size`.
Every switch defaults to what PaLM does (§2); the others exist so the paper's ablations can be
rerun at small scale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("swiglu", "gelu")


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
    # Pre-softmax logits times 1/sqrt(d_model) (PaLM §5: needed because embeddings are shared and
    # initialised N(0, 1)); False for models converted from peers that do not scale.
    scale_logits: bool = True
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
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if self.ffn_mult <= 0 or self.ffn_hidden != self.ffn_mult * self.d_model:
            raise ValueError(
                f"model.ffn_mult * model.d_model must be a positive integer, got "
                f"{self.ffn_mult} * {self.d_model}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

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
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a mapping (e.g. YAML); a `preset` key is the base, unknown keys are errors."""
        values = dict(values)
        base = cls.preset(values.pop("preset")) if "preset" in values else cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(
                f"unknown model key(s) {unknown}; valid keys: preset, {', '.join(sorted(fields))}"
            )
        return dataclasses.replace(base, **values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _paper(n_layers: int, n_heads: int, d_model: int) -> ModelConfig:
    # PaLM Table 1: head size 256, d_ff = 4 d_model, 256k vocabulary, sequence length 2048.
    return ModelConfig(
        vocab_size=256_000, d_model=d_model, n_layers=n_layers, n_heads=n_heads, head_dim=256,
        ffn_mult=4.0, max_seq_len=2048,
    )


# Parameter counts (tied embeddings) are printed by `palm info --preset NAME`; the README lists them.
PRESETS: dict[str, ModelConfig] = {
    # Table 1 of the paper: 8.63B, 62.50B, 540.35B parameters.
    "palm-8b": _paper(32, 16, 4096),
    "palm-62b": _paper(64, 32, 8192),
    "palm-540b": _paper(118, 48, 18432),
    # Small presets for CPUs and single GPUs (vocabulary is replaced by the data's at training).
    "palm-tiny": ModelConfig(vocab_size=8192, d_model=128, n_layers=4, n_heads=4, head_dim=32,
                             max_seq_len=256),
    "palm-s": ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, head_dim=64,
                          max_seq_len=256),
    "palm-m": ModelConfig(vocab_size=32_000, d_model=512, n_layers=8, n_heads=8, head_dim=64,
                          max_seq_len=512),
    "palm-150m": ModelConfig(vocab_size=32_000, d_model=768, n_layers=12, n_heads=12,
                             head_dim=64, max_seq_len=1024),
    "palm-350m": ModelConfig(vocab_size=32_000, d_model=1024, n_layers=24, n_heads=16,
                             head_dim=64, max_seq_len=2048),
    "palm-1b": ModelConfig(vocab_size=32_000, d_model=2048, n_layers=16, n_heads=8,
                           head_dim=256, max_seq_len=2048),
}
