"""Counting: parameters, model FLOPs per token (PaLM Appendix B), MFU and training memory.

Pure functions of a ModelConfig, so any preset (540B included) is counted without building it.
"""

from __future__ import annotations

from palm.config import ModelConfig


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters by kind; 'total' counts the tied embedding once (PaLM Table 1 does)."""
    c = config
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    mlp_in = c.ffn_hidden * (2 if c.activation == "swiglu" else 1)
    norms = 2 if not c.parallel_block else 1
    per_block = (
        c.d_model * (q_dim + 2 * kv_dim + mlp_in)  # fused input projection
        + q_dim * c.d_model  # attention output
        + c.ffn_hidden * c.d_model  # MLP output
        + norms * c.d_model  # LayerNorm scales
    )
    embedding = c.vocab_size * c.d_model
    output = 0 if c.tie_embeddings else embedding
    non_embedding = c.n_layers * per_block + c.d_model  # + final LayerNorm
    return {
        "total": non_embedding + embedding + output,
        "non_embedding": non_embedding,
        "embedding": embedding,
        "output_projection": output,
    }


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, PaLM Appendix B: 6N + 12 L H Q T.

    N counts the parameters that take part in matmuls: everything but the input embedding
    lookup, plus the output projection, which for tied embeddings is the embedding matrix again
    (so N is then the total parameter count, as in the paper).
    """
    counts = parameter_counts(config)
    matmul_params = counts["non_embedding"] + config.vocab_size * config.d_model
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return 6.0 * matmul_params + attention


def mfu(tokens_per_second: float, config: ModelConfig, seq_len: int, peak_flops: float) -> float:
    """Model FLOPs utilisation (PaLM Appendix B): achieved model FLOP/s over the device peak."""
    return tokens_per_second * flops_per_token(config, seq_len) / peak_flops


def training_memory_bytes(
    config: ModelConfig, param_bytes: int = 4, optimizer_states: int = 2, state_bytes: int = 4
) -> dict[str, int]:
    """Bytes for weights, gradients and optimizer state (activations excluded).

    PaLM's Adafactor without factorisation keeps two float32 moments per parameter, as AdamW.
    """
    n = parameter_counts(config)["total"]
    weights = n * param_bytes
    gradients = n * param_bytes
    optimizer = n * optimizer_states * state_bytes
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer,
            "total": weights + gradients + optimizer}
