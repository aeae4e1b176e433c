"""Counting: parameters, model FLOPs per token (PaLM Appendix B), MFU and training memory.

Pure functions of a ModelConfig, so any preset (540B included) is counted without building it.
"""

from __future__ import annotations

from palm.config import PARALLEL, ModelConfig
from palm.errors import ConfigError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # the dtypes weights may be kept in


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
    return {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "total": weights + gradients + optimizer,
    }


# Logits per chunk of the fused output projection + loss: a (tokens, V) float32 block of about
# CHUNK_BYTES on the device, but at least MIN_CHUNK_TOKENS rows so the chunk's matmuls stay
# efficient at large vocabularies. The budget is a cache-sized block on a CPU (measured:
# benchmarks/RESULTS.md, "Fused loss"; 16 MiB, 512 rows at vocab 8192, beat 8 MiB by 8% of the
# loss's time in issue 16's sweep) and larger on GPUs, where fewer, bigger matmuls win and
# memory is plentiful next to PaLM's weights (benchmarks/gpu_check.sh sweeps it). On a CPU the
# floor is 512 rows: at vocab 32000 the 256-row chunks' matmuls ran at 93-95 GFLOP/s where the
# whole-batch ones of litgpt ran at 104-107 (issue 16's --breakdown), and 512 rows made the
# loss 5% faster (each chunk adds its (V, D) product into the weight's gradient: half the passes).
# On an H200 (gpu_check.sh, d_model 1024, vocab 256k, 16k tokens, bf16) the loss took 0.163 s in
# chunks of 256 tokens, 0.099 in 1024, 0.083 in 4096 and 0.081 in one: the floor is 4096 rows
# (a 4 GiB float32 block at 256k; peak 10.5 GiB against 26.6 unchunked).
CHUNK_BYTES = {"cpu": 16 * 2**20, "cuda": 256 * 2**20}
MIN_CHUNK_TOKENS = {"cpu": 512, "cuda": 4096}


def chunk_tokens_for(vocab_size: int, device_type: str = "cpu") -> int:
    """Tokens per chunk of the fused output projection + loss (palm.loss.linear_lm_loss)."""
    budget = CHUNK_BYTES.get(device_type, CHUNK_BYTES["cpu"])
    floor = MIN_CHUNK_TOKENS.get(device_type, MIN_CHUNK_TOKENS["cpu"])
    return max(floor, budget // (4 * vocab_size))


ATTENTION_TILE = 64  # positions per score tile of palm.attention_autograd (64-128 measured alike)


def attention_tiles(length: int, tile: int = ATTENTION_TILE) -> list[tuple[int, int]]:
    """(start, end) of each tile of positions of palm.attention_autograd."""
    return [(start, min(start + tile, length)) for start in range(0, length, tile)]


def saved_probs_per_sequence(length: int, heads: int) -> int:
    """Probabilities palm.attention_autograd keeps for backward per sequence: each tile of
    positions [start, end) keeps a (rows, end) block, its heads' rows against keys 0 .. end."""
    return sum((end - start) * heads * end for start, end in attention_tiles(length))


def fits_saved_probs(length: int, heads: int, fused_rows: int) -> bool:
    """Whether the kept probabilities take no more memory than the layer's fused projection
    output (length, fused_rows), which training keeps anyway."""
    return saved_probs_per_sequence(length, heads) <= length * fused_rows


def activation_bytes(
    config: ModelConfig,
    micro_batch: int,
    seq_len: int,
    act_bytes: int,
    checkpointing: bool = False,
    device_type: str = "cpu",
    tensor_parallel: int = 1,
) -> int:
    """Estimate of the activations one micro-batch keeps for the backward pass.

    Per token and layer the parallel block saves: the block input and its LayerNorm output
    (2 d), the fused input projection's output (q + k + v + MLP input), the attention output
    and RoPE-rotated q, k (about 2 H Q + 2 KV Q), and SwiGLU's gate activation and product
    (2 d_ff). Eager float32/64 training on the CPU keeps multi-query attention's probabilities
    too (palm.attention_autograd, where they fit in the fused rows). With activation
    checkpointing only each block's input is kept, plus one block's full set while it is
    recomputed. The output projection and loss are fused
    (palm.loss.linear_lm_loss): it keeps float32 gradients for the final activations and for
    the output matrix, and makes the logits one (chunk, vocab) float32 block (softmax in place) at a
    time, never (tokens, vocab). With `tensor_parallel` ranks each keeps its share of the heads,
    the MLP and the vocabulary; the residual stream, its LayerNorm and the (multi-query) key/value
    head are on every rank.
    """
    c, tp = config, tensor_parallel
    q_dim, kv_dim = c.n_heads * c.head_dim // tp, c.n_kv_heads * c.head_dim
    kv_dim //= tp if c.n_kv_heads > 1 else 1
    mlp_in = c.ffn_hidden * (2 if c.activation == "swiglu" else 1) // tp
    per_token_layer = 2 * c.d_model + (q_dim + 2 * kv_dim + mlp_in) + 2 * (q_dim + kv_dim)
    per_token_layer += 2 * c.ffn_hidden // tp
    tokens = micro_batch * seq_len
    per_layer = tokens * per_token_layer
    heads, fused_rows = c.n_heads // tp, q_dim + 2 * kv_dim + mlp_in
    if device_type == "cpu" and act_bytes >= 4 and c.n_kv_heads == 1:
        if fits_saved_probs(seq_len, heads, fused_rows):  # the model's tiles_serve
            per_layer += micro_batch * saved_probs_per_sequence(seq_len, heads)
    if checkpointing:
        layers = (tokens * c.n_layers * c.d_model + per_layer) * act_bytes
    else:
        layers = c.n_layers * per_layer * act_bytes
    vocab = c.vocab_size // tp
    chunk = min(tokens, chunk_tokens_for(vocab, device_type))
    loss = (tokens * c.d_model + vocab * c.d_model + chunk * vocab) * 4
    return layers + loss


def per_device_memory_bytes(
    config: ModelConfig,
    devices: int,
    parallel: str,
    micro_batch: int,
    seq_len: int,
    param_bytes: int = 4,
    act_bytes: int = 4,
    checkpointing: bool = False,
    tensor_parallel: int = 1,
    device_type: str = "cuda",
) -> dict[str, int]:
    """Memory on one device of a parallel run (PaLM §4 shards weights, grads, optimizer).

    ddp: every device holds everything. fsdp: weights, gradients and optimizer state are split
    over the devices, and one block's weights are gathered whole while it runs (twice that with
    prefetching, which is what we count). `tensor_parallel` ranks split every layer (its share
    of a block is what FSDP gathers), with the key/value head on each of them.
    """
    if parallel not in PARALLEL:
        raise ConfigError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    full = training_memory_bytes(config, param_bytes=param_bytes)
    share = devices if parallel == "fsdp" else tensor_parallel
    out = {k: -(-full[k] // share) for k in ("weights", "gradients", "optimizer")}
    if parallel == "fsdp":
        counts = parameter_counts(config)
        block = (counts["non_embedding"] - config.d_model) // config.n_layers
        out["gathered"] = 2 * block * param_bytes // tensor_parallel
    out["activations"] = activation_bytes(
        config, micro_batch, seq_len, act_bytes, checkpointing, device_type, tensor_parallel
    )
    out["total"] = sum(out.values())
    return out
