"""The PaLM model against the paper (§2, §5, Table 1) and an independent float64 reference."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import pytest
import torch
import torch.nn.functional as F

from palm import ModelConfig, PaLM, lm_loss
from palm.rope import apply_rope, rope_angles

TINY = ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=3, head_dim=8, max_seq_len=64)


def make(config: ModelConfig = TINY, seed: int = 0) -> PaLM:
    torch.manual_seed(seed)
    return PaLM(config).eval()


# --- an independent reference, written from the paper's formulas, in float64 -----------------


def reference_logits(model: PaLM, tokens: torch.Tensor) -> torch.Tensor:
    """Plain float64 forward pass, with explicit softmax attention and per-head loops."""
    c = model.config
    p = {k: v.double() for k, v in model.state_dict().items()}
    T = tokens.shape[1]
    x = p["embedding.weight"][tokens]  # (B, T, D)
    pos = torch.arange(T, dtype=torch.float64)
    inv = 1.0 / c.rope_base ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim)
    ang = pos[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(t):
        half = c.head_dim // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

    def ln(t, w):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + c.norm_eps) * w

    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    qd, kvd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    for i in range(c.n_layers):
        w_in = p[f"blocks.{i}.in_proj.weight"]
        w_qkv, w_mlp = w_in[: qd + 2 * kvd], w_in[qd + 2 * kvd :]

        def attention(h):
            q, k, v = (h @ w_qkv.T).split([qd, kvd, kvd], -1)
            heads = []
            for head in range(c.n_heads):
                kv_head = 0 if c.multi_query else head
                sl = slice(kv_head * c.head_dim, (kv_head + 1) * c.head_dim)
                qh = rope(q[..., head * c.head_dim : (head + 1) * c.head_dim])
                kh, vh = rope(k[..., sl]), v[..., sl]
                scores = qh @ kh.transpose(-1, -2) / math.sqrt(c.head_dim)
                scores = scores.masked_fill(~causal, float("-inf"))
                heads.append(torch.softmax(scores, -1) @ vh)
            return torch.cat(heads, -1) @ p[f"blocks.{i}.attn_out.weight"].T

        def mlp(h):
            u = h @ w_mlp.T
            if c.activation == "swiglu":
                value, gate = u.chunk(2, -1)
                u = gate * torch.sigmoid(gate) * value  # Swish(xW) * (xV)
            else:
                u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
            return u @ p[f"blocks.{i}.mlp_out.weight"].T

        h = ln(x, p[f"blocks.{i}.norm.weight"])
        if c.parallel_block:
            x = x + attention(h) + mlp(h)
        else:
            x = x + attention(h)
            x = x + mlp(ln(x, p[f"blocks.{i}.mlp_norm.weight"]))
    x = ln(x, p["final_norm.weight"])
    out_w = p["embedding.weight"] if c.tie_embeddings else p["lm_head.weight"]
    # PaLM §5 scales the logits of the shared N(0, 1) embedding; an untied head is not scaled.
    scale = 1 / math.sqrt(c.d_model) if c.scale_logits and c.tie_embeddings else 1.0
    return (x @ out_w.T) * scale


SWITCHES = list(itertools.product([True, False], [True, False], ["swiglu", "gelu"], [True, False]))


@pytest.mark.parametrize("parallel,multi_query,activation,tied", SWITCHES)
def test_matches_float64_reference_for_every_ablation(parallel, multi_query, activation, tied):
    config = dataclasses.replace(
        TINY,
        parallel_block=parallel,
        multi_query=multi_query,
        activation=activation,
        tie_embeddings=tied,
    )
    model = make(config)
    tokens = torch.randint(0, config.vocab_size, (2, 11))
    got = model(tokens).double()
    want = reference_logits(model, tokens)
    assert got.shape == (2, 11, config.vocab_size)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_switches_change_the_architecture():
    base = make()
    n_in = lambda m: m.blocks[0].in_proj.weight.shape[0]  # noqa: E731
    c = TINY
    # PaLM: q (H*Q) + one k and one v head (Q each) + SwiGLU's two halves.
    assert n_in(base) == c.n_heads * c.head_dim + 2 * c.head_dim + 2 * 4 * c.d_model
    mha = make(dataclasses.replace(c, multi_query=False))
    assert n_in(mha) == 3 * c.n_heads * c.head_dim + 2 * 4 * c.d_model
    gelu = make(dataclasses.replace(c, activation="gelu"))
    assert n_in(gelu) == c.n_heads * c.head_dim + 2 * c.head_dim + 4 * c.d_model
    serial = make(dataclasses.replace(c, parallel_block=False))
    assert base.blocks[0].mlp_norm is None and serial.blocks[0].mlp_norm is not None
    untied = make(dataclasses.replace(c, tie_embeddings=False))
    assert untied.num_parameters() == base.num_parameters() + c.vocab_size * c.d_model


def test_multi_query_shares_one_key_value_head():
    model = make()
    cache = model.new_cache(batch_size=2)
    assert cache.keys[0].shape == (2, 1, TINY.max_seq_len, TINY.head_dim)


def test_n_heads_times_head_dim_need_not_equal_d_model():
    config = ModelConfig(vocab_size=50, d_model=40, n_layers=1, n_heads=3, head_dim=16)
    model = make(config)
    tokens = torch.randint(0, 50, (1, 7))
    torch.testing.assert_close(
        model(tokens).double(), reference_logits(model, tokens), atol=2e-5, rtol=1e-5
    )


def test_causal_future_tokens_do_not_change_past_logits():
    model = make()
    tokens = torch.randint(0, TINY.vocab_size, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, TINY.vocab_size, (2, 8))
    a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(1)
    q, k = torch.randn(16), torch.randn(16)
    cos, sin = rope_angles(torch.arange(40), 16, 10_000.0)

    def score(m, n):
        return (apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])).item()

    for shift in (1, 7, 20):
        assert score(3, 1) == pytest.approx(score(3 + shift, 1 + shift), abs=1e-4)
        assert score(10, 10) == pytest.approx(score(10 + shift, 10 + shift), abs=1e-4)
    assert score(5, 0) != pytest.approx(score(5, 3), abs=1e-3)
    # A rotation: norms are preserved.
    assert apply_rope(q, cos[9], sin[9]).norm() == pytest.approx(q.norm().item(), rel=1e-5)


def test_no_bias_parameters_anywhere():
    for config in (TINY, dataclasses.replace(TINY, parallel_block=False, tie_embeddings=False)):
        model = make(config)
        names = [name for name, _ in model.named_parameters()]
        assert not [n for n in names if "bias" in n]
        for module in model.modules():
            assert getattr(module, "bias", None) is None
        # The one buffer: RoPE's tables, a function of the config (not in the state dict).
        assert [name for name, _ in model.named_buffers()] == ["rope_tables"]
        assert "rope_tables" not in model.state_dict()


def test_tied_embedding_is_one_tensor():
    model = make()
    assert model.output_weight is model.embedding.weight
    assert model.lm_head is None
    params = list(model.parameters())
    assert sum(p is model.embedding.weight for p in params) == 1
    # A gradient through the output reaches the embedding.
    model(torch.tensor([[1, 2, 3]]))[0, -1, 5].backward()
    assert model.embedding.weight.grad[5].abs().sum() > 0


def test_initialisation_statistics_follow_paper():
    config = ModelConfig(vocab_size=4096, d_model=256, n_layers=2, n_heads=4, head_dim=64)
    model = make(config)
    emb = model.embedding.weight
    assert emb.mean().item() == pytest.approx(0.0, abs=0.01)
    assert emb.std().item() == pytest.approx(1.0, rel=0.01)  # PaLM §5: embeddings N(0, 1)
    for name, p in model.named_parameters():
        if p.ndim == 2 and "embedding" not in name:
            fan_in = p.shape[1]  # variance 1/fan_in
            assert p.std().item() == pytest.approx(fan_in**-0.5, rel=0.03), name
        elif p.ndim == 1:
            assert torch.equal(p, torch.ones_like(p)), name
    # Logits start at unit scale thanks to the 1/sqrt(d_model) output scaling.
    logits = model(torch.randint(0, 4096, (2, 32)))
    assert 0.7 < logits.std().item() < 1.4


TABLE_1 = {"palm-8b": 8.63e9, "palm-62b": 62.50e9, "palm-540b": 540.35e9}


@pytest.mark.parametrize("name", list(TABLE_1))
def test_paper_presets_match_table_1_and_build_on_meta_quickly(name):
    start = time.perf_counter()
    with torch.device("meta"):
        model = PaLM(ModelConfig.preset(name))
    assert time.perf_counter() - start < 30
    assert model.embedding.weight.is_meta
    assert model.num_parameters() == pytest.approx(TABLE_1[name], rel=1e-3)
    c = model.config
    assert (c.head_dim, c.ffn_hidden, c.vocab_size) == (256, 4 * c.d_model, 256_000)


def test_unknown_preset_and_bad_config_are_errors():
    with pytest.raises(ValueError, match="choose one of"):
        ModelConfig.preset("palm-9000b")
    with pytest.raises(ValueError, match="activation"):
        dataclasses.replace(TINY, activation="relu")
    with pytest.raises(ValueError, match="unknown model key"):
        ModelConfig.from_dict({"d_modle": 3})


def test_z_loss_and_cross_entropy_match_float64_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3 + 2
    targets = torch.randint(0, 11, (3, 5))
    targets[0, 0] = -100  # ignored (padding)
    out = lm_loss(logits, targets, z_loss_coef=1e-4)
    l64 = logits.double()
    keep = targets != -100
    log_z = torch.log(torch.exp(l64).sum(-1))
    nll = -torch.log_softmax(l64, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    want_ce = nll[keep].mean()
    want_z = 1e-4 * (log_z[keep] ** 2).mean()
    assert out.cross_entropy.item() == pytest.approx(want_ce.item(), rel=1e-6)
    assert out.z_loss.item() == pytest.approx(want_z.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((want_ce + want_z).item(), rel=1e-6)
    assert out.n_tokens.item() == keep.sum().item()
    # Same cross-entropy as PyTorch's own.
    torch.testing.assert_close(
        out.cross_entropy, F.cross_entropy(logits.view(-1, 11), targets.view(-1))
    )
    # The coefficient is configurable.
    assert lm_loss(logits, targets, z_loss_coef=0.0).z_loss.item() == 0.0


@pytest.mark.parametrize("parallel,multi_query", [(True, True), (False, False)])
def test_cached_decoding_equals_full_forward(parallel, multi_query):
    config = dataclasses.replace(TINY, parallel_block=parallel, multi_query=multi_query)
    model = make(config)
    tokens = torch.randint(0, config.vocab_size, (3, 30))
    full = model(tokens)
    cache = model.new_cache(batch_size=3, max_len=30)
    # A prompt, then a chunk, then one token at a time.
    pieces = [model(tokens[:, :9], cache), model(tokens[:, 9:14], cache)]
    pieces += [model(tokens[:, t : t + 1], cache) for t in range(14, 30)]
    assert cache.length == 30
    assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="exceeds the cache"):
        model(tokens[:, :1], cache)


def test_bf16_autocast_keeps_multi_query_attention_one_head_wide(monkeypatch):
    """Under autocast, SDPA gets q, k, v all in bf16 and the shared key/value head is never
    copied per head (its storage stays one head wide); logits match float32 to bf16 accuracy."""
    import palm.model as model_module

    config = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, head_dim=16)
    torch.manual_seed(0)
    model = PaLM(config).eval()
    tokens = torch.randint(0, 64, (2, 24))
    reference = model(tokens)
    seen = []
    real = model_module.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, k.untyped_storage().nbytes(), k.shape))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert len(seen) == config.n_layers
    for q_dtype, k_dtype, v_dtype, k_bytes, k_shape in seen:
        assert q_dtype == k_dtype == v_dtype == torch.bfloat16
        one_head = 2 * 24 * 16 * 2  # (B, 1, T, Q) in bf16, broadcast to the heads as a view
        assert k_shape[1] == config.n_heads and k_bytes == one_head
    torch.testing.assert_close(logits.float(), reference, rtol=0.05, atol=0.05)


def test_only_the_shared_embedding_scales_the_logits():
    """PaLM §5 scales logits by 1/sqrt(d) because the shared embedding is N(0, 1); an untied,
    fan-in initialised head already gives unit-scale logits, so scaling it again would shrink
    them by sqrt(d) (the audit's nit)."""
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, d_model=256, head_dim=32, n_heads=4, vocab_size=512)
    tokens = torch.randint(0, 512, (4, 32))
    for tied in (True, False):
        logits = PaLM(dataclasses.replace(config, tie_embeddings=tied))(tokens)
        assert 0.5 < float(logits.std()) < 2.0, (tied, float(logits.std()))


def test_the_block_compiles_without_graph_breaks():
    """torch.compile sees the whole block as one graph (issue 16); the model has exactly one
    break, the fused output projection + loss that runs eagerly on purpose (palm.loss)."""
    from palm.rope import rotary_tables

    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, head_dim=16)
    model = PaLM(config)
    x = torch.randn(2, 8, 32)
    rope = rotary_tables(torch.arange(8), config, x.dtype)
    assert torch._dynamo.explain(model.blocks[0])(x, rope).graph_break_count == 0
    tokens = torch.randint(0, 64, (2, 8))
    assert torch._dynamo.explain(model)(tokens, targets=tokens).graph_break_count == 1


def test_rope_tables_are_made_once_in_float32_wherever_the_model_goes():
    """The model keeps RoPE's tables as a float32 buffer (issue 16: made per forward, compiled
    code recomputed cos/sin per element); they stay exact through casts and meta builds."""
    from palm.rope import rotary_tables

    model = make()
    L = TINY.max_seq_len
    fresh = torch.stack(rotary_tables(torch.arange(L), TINY, torch.float32))
    assert torch.equal(model.rope_tables, fresh)
    # bf16 and back: remade, not rounded.
    model.to(torch.bfloat16).to(torch.float32)
    assert model.rope_tables.dtype == torch.float32 and torch.equal(model.rope_tables, fresh)
    # Built on meta and loaded by assignment (palm.hf, palm.interop), or to_empty (FSDP).
    with torch.device("meta"):
        loaded, emptied = PaLM(TINY), PaLM(TINY)
    loaded.load_state_dict(model.state_dict(), assign=True)
    emptied.to_empty(device="cpu")
    assert torch.equal(loaded.rope_tables, fresh) and torch.equal(emptied.rope_tables, fresh)
    tokens = torch.randint(0, TINY.vocab_size, (2, L + 5))  # past max_seq_len: made per call
    longer = model(tokens)
    assert torch.equal(loaded(tokens[:, :L]), model(tokens[:, :L]))
    torch.testing.assert_close(longer[:, :L], model(tokens[:, :L]), rtol=1e-5, atol=1e-5)


def test_compiled_training_computes_no_cos_or_sin():
    """What torch.compile traces for a training step reads RoPE's tables, never makes them
    (inductor would inline the cos/sin into every kernel that reads them)."""
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, head_dim=16)
    model = PaLM(config)
    targets = []

    def record(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    torch._dynamo.reset()
    tokens = torch.randint(0, 64, (2, 8))
    torch.compile(model, backend=record)(tokens, targets=tokens).loss.backward()
    # Traced: attention is CPU training's tiles (palm.attention_autograd), not SDPA.
    assert any("causal_mqa" in t for t in targets), targets
    assert not [t for t in targets if "cos" in t or "sin" in t]
