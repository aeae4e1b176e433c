"""The PaLM model (Chowdhery et al., 2022, §2), written for one device.

A decoder-only Transformer with, per the paper:
- SwiGLU MLP: Swish(xW) * (xV), then an output matrix (three matrices);
- the parallel block y = x + MLP(LN(x)) + Attention(LN(x)), one LayerNorm shared by both
  branches, so the input matmuls of both branches fuse into one;
- multi-query attention: n_heads query heads, one shared key head and one shared value head;
- RoPE on queries and keys (palm.rope);
- shared input/output embedding, logits scaled by 1/sqrt(d_model);
- no biases anywhere, LayerNorm with a scale only;
- initialisation from §5: kernels N(0, 1/fan_in), embeddings N(0, 1).

Parallelism (DDP/FSDP) is applied from outside; nothing here touches torch.distributed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palm.attention_autograd import causal_mqa, tiles_serve
from palm.block_autograd import split_rope_swiglu, to_heads
from palm.config import ModelConfig
from palm.errors import ConfigError
from palm.kv_cache import (
    KVCache,
    WeightCopies,
    cache_dtype,
    one_token_attention,
    padding_mask,
    weight_copies,
)
from palm.loss import LossOutput, linear_lm_loss
from palm.rope import RotaryTables, apply_rope, rotary_table_stack, rotary_tables

# ---------------------------------------------------------------------------------------------
# The block
# ---------------------------------------------------------------------------------------------


class PaLMBlock(nn.Module):
    """One Transformer block; parallel (PaLM §2) or, as an ablation, serial.

    Parallel form (default), one LayerNorm feeding both branches:

        x ─┬─ LN ─┬─ in_proj ─┬─ q, k, v ── RoPE ── attention ── attn_out ─┐
           │      │           └─ SwiGLU ───────────────────────── mlp_out ─┤
           └──────┴──────────────────────────────────────────────────── + ─┴─> y

    The single `in_proj` holds, row-wise, [q | k | v | MLP input]; the serial form uses the
    same matrix in two row slices, so both forms have identical parameters.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.q_dim = c.n_heads * c.head_dim
        self.kv_dim = c.n_kv_heads * c.head_dim
        self.norm = nn.LayerNorm(c.d_model, eps=c.norm_eps, bias=False)
        # The serial ablation needs its own LayerNorm before the MLP.
        self.mlp_norm = (
            None if c.parallel_block else nn.LayerNorm(c.d_model, eps=c.norm_eps, bias=False)
        )
        # Rows of the fused input projection: q, k, v, then the MLP's (value, gate) or one.
        mlp_rows = (c.ffn_hidden,) * (2 if c.activation == "swiglu" else 1)  # SwiGLU: two halves
        self.mlp_in_dim = sum(mlp_rows)
        self.row_sizes = (self.q_dim, self.kv_dim, self.kv_dim, *mlp_rows)
        in_dim = self.q_dim + 2 * self.kv_dim + self.mlp_in_dim
        self.in_proj = nn.Linear(c.d_model, in_dim, bias=False)
        # Five matrices in one weight: the optimizer keeps their statistics apart (as T5X does
        # for fused QKV; palm.optim.ROW_BLOCKS).
        self.in_proj.weight.row_blocks = self.row_sizes
        self.attn_out = nn.Linear(self.q_dim, c.d_model, bias=False)
        self.mlp_out = nn.Linear(c.ffn_hidden, c.d_model, bias=False)
        self.probs_pool: list[Tensor] = []  # palm.attention_autograd's memory, step to step

    def attention(
        self,
        qk: Tensor,
        v: Tensor,
        rope: RotaryTables,
        cache: KVCache | None,
        layer: int,
        position: Tensor | None = None,
    ) -> Tensor:
        """Causal multi-query attention on qk (B, T, H*Q + KH*Q), the query rows then the key
        rows (in_proj's order), and v (B, T, KH*Q). With `position` (1,), the static-shape
        decoding step: one token (T = 1) is written there and attends over the whole cache,
        positions after it masked (gpt-fast's approach)."""
        T = qk.shape[1]
        q, k = self.rotated_heads(qk, rope)  # (B, H, T, Q), (B, KH, T, Q)
        v = to_heads(v, self.config.head_dim)  # (B, KH, T, Q)
        past = 0
        if position is not None and cache is not None:
            k, v = cache.store_at(layer, position, k, v)  # (B, KH, max_len, Q)
            mask = torch.arange(cache.max_len, device=q.device)[None] <= position  # (1, L)
            if cache.key_mask is not None:
                mask = cache.key_mask[:, None, None, :] & mask  # (B, 1, 1, max_len)
            return self.attend(q, k, v, mask, False)
        if cache is not None:
            past = cache.length
            k, v = cache.store(layer, k, v)  # (B, KH, past + T, Q)
        if past == 0:
            mask, causal = None, True
        elif T == 1:
            mask, causal = None, False  # one new token sees every stored one
        else:
            # Query i sits at position past + i and may see keys 0 .. past + i.
            key_pos = torch.arange(past + T, device=q.device)
            query_pos = torch.arange(past, past + T, device=q.device)
            mask, causal = key_pos[None, :] <= query_pos[:, None], False
        if cache is not None and cache.key_mask is not None:
            mask, causal = padding_mask(cache.key_mask, past, T), False
        return self.attend(q, k, v, mask, causal)

    def rotated_heads(self, qk: Tensor, rope: RotaryTables) -> tuple[Tensor, Tensor]:
        """RoPE on the query and key heads of qk (B, T, (H + KH) * Q): (B, H, T, Q), (B, KH, T, Q).
        A decoding step (T = 1) under plain RoPE rotates both by one table in one call (S: 2.8%
        of a batch-1 step); longer rows rotate apart, so q stays (B, T, H, Q) memory, which
        causal_mqa reads uncopied. Head counts come off the rows: under tensor parallelism
        (palm.parallel) a rank holds a share of the query heads."""
        kv_heads = self.kv_dim // self.config.head_dim
        heads = to_heads(qk, self.config.head_dim)  # (B, H + KH, T, Q)
        split = (heads.shape[1] - kv_heads, kv_heads)
        if qk.shape[1] == 1 and not self.config.xpos_scale_base:
            return apply_rope(heads, rope.q_cos, rope.q_sin).split(split, dim=1)
        q, k = heads.split(split, dim=1)  # (xPos: queries and keys scale differently)
        return apply_rope(q, rope.q_cos, rope.q_sin), apply_rope(k, rope.k_cos, rope.k_sin)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """Attention of q (B, H, T, Q) over k, v (B, KH, S, Q) -> (B, T, H*Q)."""
        (B, H, T, Q), KH = q.shape, k.shape[1]
        if T == 1 and KH != H and not causal:
            # Heads as rows against the shared head: the cache is never broadcast (nor copied).
            out = one_token_attention(q.view(B, KH, H // KH, -1), k, v, mask)
            return out.reshape(B, 1, self.q_dim)  # heads in order: (B, 1, H*Q)
        if causal and mask is None and KH == 1 and tiles_serve(q, sum(self.row_sizes)):
            return causal_mqa(q, k, v, self.probs_pool)  # CPU training: (B, T, H*Q)
        if KH != H:
            # Broadcast the shared head: expand() is a view, no copy of the keys/values.
            k, v = k.expand(B, H, k.shape[2], Q), v.expand(B, H, v.shape[2], Q)
        attention = one_token_attention if T == 1 else F.scaled_dot_product_attention
        out = attention(q, k, v, attn_mask=mask, is_causal=causal)
        return out.transpose(1, 2).reshape(B, T, self.q_dim)  # (B, T, H*Q)

    def activation(self, *pieces: Tensor) -> Tensor:
        """MLP hidden activations from the MLP's input rows: (value, gate) or one piece."""
        if self.config.activation == "swiglu":
            value, gate = pieces  # PaLM §2: Swish(xW) * (xV)
            return F.silu(gate) * value
        return F.gelu(pieces[0])

    def one_node_middle(self, fused: Tensor, rope: RotaryTables, cache: KVCache | None) -> bool:
        """Whether palm.block_autograd's split + RoPE + SwiGLU node serves: eager training (not
        compiled), no cache, plain tensors (not DTensor), tables in the rows' dtype or float32."""
        return (
            fused.requires_grad
            and cache is None
            and self.config.activation == "swiglu"
            and type(fused) is Tensor
            and rope.q_cos.dtype in (fused.dtype, torch.promote_types(fused.dtype, torch.float32))
            and not torch.compiler.is_compiling()
        )

    def residual_dropout(self, h: Tensor) -> Tensor:
        return F.dropout(h, self.config.dropout, self.training) if self.config.dropout else h

    def project_in(
        self, h: Tensor, cache: KVCache | None, layer: int, rows: slice | None = None
    ) -> Tensor:
        """h @ in_proj's rows (all by default); decoding by the cache's faster kernel for it."""
        weight = self.in_proj.weight if rows is None else self.in_proj.weight[rows]
        fast = None if cache is None else cache.product(h, weight, "in_proj", layer, rows)
        if fast is not None:
            return fast
        if rows is None:
            return self.in_proj(h)  # the module call: tensor parallelism hooks into it
        return F.linear(h, weight)

    def project_out(self, x: Tensor, name: str, cache: KVCache | None, layer: int) -> Tensor:
        """The `name` projection (attn_out, mlp_out) of x; decoding by the cache's faster kernel."""
        module = getattr(self, name)
        fast = None if cache is None else cache.product(x, module.weight, name, layer)
        return module(x) if fast is None else fast

    def forward(
        self,
        x: Tensor,
        rope: RotaryTables,
        cache: KVCache | None = None,
        layer: int = 0,
        position: Tensor | None = None,
    ) -> Tensor:
        if self.mlp_norm is None:
            # Parallel block: one LayerNorm, one fused input matmul for both branches.
            fused = self.project_in(self.norm(x), cache, layer)  # (B, T, q + 2kv + mlp_in)
            if self.one_node_middle(fused, rope, cache):  # eager training's fast path
                q, k, v, mlp = split_rope_swiglu(fused, rope, self.row_sizes, self.config.head_dim)
                attn = self.attend(q, k, v, None, True)
            else:  # split() into views: its backward is one cat, not a zero-filled add per slice
                q_rows, kv_rows, _, *mlp_rows = self.row_sizes
                qk, v, *mlp_in = fused.split((q_rows + kv_rows, kv_rows, *mlp_rows), dim=-1)
                attn = self.attention(qk, v, rope, cache, layer, position)
                mlp = self.activation(*mlp_in)
            out = self.project_out(attn, "attn_out", cache, layer)
            return x + self.residual_dropout(out + self.project_out(mlp, "mlp_out", cache, layer))
        # Serial block (ablation): attention first, then the MLP on the updated stream.
        split = self.q_dim + 2 * self.kv_dim  # in_proj's rows: [q | k | v] then the MLP's
        qkv_rows, mlp_rows = slice(0, split), slice(split, None)
        qk, v = self.project_in(self.norm(x), cache, layer, qkv_rows).split(
            (self.q_dim + self.kv_dim, self.kv_dim), dim=-1
        )
        attn = self.attention(qk, v, rope, cache, layer, position)
        x = x + self.residual_dropout(self.project_out(attn, "attn_out", cache, layer))
        mlp_in = self.project_in(self.mlp_norm(x), cache, layer, mlp_rows)
        mlp_in = mlp_in.split(self.row_sizes[3:], dim=-1)
        mlp = self.activation(*mlp_in)
        return x + self.residual_dropout(self.project_out(mlp, "mlp_out", cache, layer))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class PaLM(nn.Module):
    """PaLM language model: `model(tokens)` maps (B, T) token ids to (B, T, vocab) logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(PaLMBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=False)
        # Tied (PaLM §2): the output projection *is* the embedding matrix, one tensor.
        self.lm_head = (
            None
            if config.tie_embeddings
            else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        # RoPE's tables for positions 0..max_seq_len-1, made once (made per forward, compiled
        # steps recomputed cos, sin and pow in every kernel reading them: 5% at S). Not in the
        # state dict; remade in float32 wherever the model goes (_apply) and after a load.
        tables = rotary_table_stack(config.max_seq_len, config)
        self.register_buffer("rope_tables", tables, persistent=False)
        self.register_load_state_dict_post_hook(_remake_rope_tables)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PaLM §5 "Weight initialization": kernels N(0, 1/fan_in), embeddings N(0, 1).

        On the `meta` device this does nothing (no storage), so any preset builds instantly.
        """
        nn.init.normal_(self.embedding.weight, mean=0.0, std=1.0)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_in = module.weight.shape[1]
                nn.init.normal_(module.weight, mean=0.0, std=fan_in**-0.5)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)

    def _apply(self, fn, recurse=True):  # .to / .half / .to_empty: tables rounded or empty
        super()._apply(fn, recurse)
        self.remake_rope_tables()
        return self

    @torch.no_grad()
    def remake_rope_tables(self) -> None:
        """RoPE's tables in float32 on the embedding's device (meta stays meta: no storage)."""
        device = self.embedding.weight.device
        self.rope_tables = rotary_table_stack(self.config.max_seq_len, self.config, device)

    def rotary(self, start: int, length: int, dtype: torch.dtype) -> RotaryTables:
        """RoPE's tables for positions start .. start + length - 1: rows of `rope_tables`, or
        made for these positions past max_seq_len (RoPE extrapolates)."""
        if start + length <= self.rope_tables.shape[1]:
            return RotaryTables(*self.rope_tables[:, start : start + length].to(dtype).unbind(0))
        positions = torch.arange(start, start + length, device=self.rope_tables.device)
        return rotary_tables(positions, self.config, dtype)

    @property
    def output_weight(self) -> Tensor:
        return self.embedding.weight if self.lm_head is None else self.lm_head.weight

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device=None,
        dtype=None,
        transposed_weights: bool | WeightCopies | None = None,
    ) -> KVCache:
        """An empty key/value cache for `batch_size` sequences of up to `max_len` tokens, in
        autocast's dtype where autocast is on (`cache_dtype`). `transposed_weights`: weight
        copies in a layout decoding multiplies by faster (palm.kv_cache), memory while the cache
        lives (None: where they pay for this batch; share one set: `weight_copies`)."""
        c = self.config
        max_len = max_len or c.max_seq_len
        device = torch.device(device or self.embedding.weight.device)
        dtype = dtype or cache_dtype(self.embedding.weight.dtype, device.type)
        shape = (batch_size, c.n_kv_heads, max_len, c.head_dim)
        make = lambda: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        rope = self.rotary(0, max_len, self.embedding.weight.dtype)  # (max_len, Q) each
        keys, values = [make() for _ in range(c.n_layers)], [make() for _ in range(c.n_layers)]
        cache = KVCache(keys, values, rope=rope)
        cache.hold(weight_copies(self, transposed_weights, batch_size) or None)
        return cache

    def forward(
        self,
        tokens: Tensor,
        cache: KVCache | None = None,
        *,
        targets: Tensor | None = None,
        z_loss_coef: float = 1e-4,
    ) -> Tensor | LossOutput:
        """Logits (B, T, vocab) for tokens (B, T); with `targets` (B, T), the loss instead.

        With a cache, `tokens` continue the cached sequence: their positions start at
        `cache.length`, they attend to the cached keys/values, and the cache grows by T.
        With targets, returns `lm_loss(logits, targets, z_loss_coef)` (targets IGNORE_INDEX left
        out) by `linear_lm_loss`, which never holds the (B, T, vocab) logits whole. A forward()
        argument, not a method, so DDP/FSDP wrappers and torch.compile see it.
        """
        x = self.features(tokens, cache)
        if targets is not None:
            return self.output_loss(x, targets, z_loss_coef)
        return self.decoding_logits(x, cache)

    # The output projection, as logits or fused with the loss. Methods, so that tensor
    # parallelism (palm.parallel) can replace them with vocabulary-parallel ones from outside.
    def output_logits(self, x: Tensor) -> Tensor:
        return F.linear(x, self.output_weight)  # (..., V)

    def decoding_logits(self, x: Tensor, cache: KVCache | None) -> Tensor:
        """`output_logits`; decoding by the cache's faster kernel for it where it has one."""
        fast = None if cache is None else cache.product(x, self.output_weight, "output")
        return self.output_logits(x) if fast is None else fast

    def output_loss(self, x: Tensor, targets: Tensor, z_loss_coef: float) -> LossOutput:
        return linear_lm_loss(x, self.output_weight, targets, z_loss_coef)

    def features(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        """The final activations (B, T, D) that the output projection turns into logits."""
        B, T = tokens.shape
        past = 0 if cache is None else cache.length
        if cache is not None and past + T > cache.max_len:
            raise ConfigError(
                f"sequence of {past + T} tokens exceeds the cache's {cache.max_len}; "
                "make the cache larger (new_cache(max_len=...))"
            )
        x = self.embedding(tokens)  # (B, T, D); PaLM: no scaling, no LayerNorm on embeddings
        if cache is not None and cache.rope is not None:
            rope = RotaryTables(*(t[past : past + T] for t in cache.rope))  # views
        else:
            rope = self.rotary(past, T, x.dtype)  # shared by all layers
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer)
        if cache is not None:
            cache.length += T
        return self.head_input(x)

    def decode_static(self, token: Tensor, position: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, V) of one token per row (B, 1) at `position` (1,), a tensor, so that every
        shape is the cache's and one torch.compile graph serves every step (gpt-fast). Leaves
        `cache.length` to the caller, as no Python number may change inside the graph."""
        x = self.embedding(token)  # (B, 1, D)
        rope = RotaryTables(*(t.index_select(0, position) for t in cache.rope))  # (1, Q) each
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer, position)
        return self.decoding_logits(self.head_input(x)[:, -1], cache)

    def head_input(self, x: Tensor) -> Tensor:
        """Final LayerNorm and PaLM's logit scaling of the activations (B, T, D)."""
        c = self.config
        if c.final_norm:
            x = self.final_norm(x)
        if c.scale_logits and c.tie_embeddings:
            # PaLM §5: pre-softmax logits times 1/sqrt(d_model), because the shared embedding
            # is N(0, 1); an untied head is fan-in initialised and needs no scaling. Applied to
            # the (B, T, D) activations rather than the (B, T, V) logits: the same, cheaper.
            x = x * (1.0 / math.sqrt(c.d_model))
        return x

    def num_parameters(self, *, exclude_embedding: bool = False) -> int:
        """Distinct parameters (the tied embedding counted once)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.embedding.weight.numel() if exclude_embedding else total


def _remake_rope_tables(model: PaLM, _incompatible_keys) -> None:
    """load_state_dict's post-hook (a function, so a model stays picklable)."""
    model.remake_rope_tables()
