"""Multi-query causal attention in tiles (palm.attention_autograd) against float64 attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_block_autograd import node_names  # tests/ is on sys.path (pytest's rootdir import)

import palm.model
from palm import ModelConfig, PaLM
from palm.attention_autograd import TILE, causal_mqa
from palm.flops import fits_saved_probs, saved_probs_per_sequence

CONFIG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, head_dim=8, max_seq_len=80)


def reference_attention(q, k, v):
    """Causal softmax(q k^T / sqrt(Q)) v written out, one shared head broadcast: (B, T, H*Q)."""
    B, H, T, Q = q.shape
    scores = q @ k.transpose(-1, -2) / Q**0.5  # (B, H, T, T) against k (B, 1, T, Q)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    out = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
    return out.transpose(1, 2).reshape(B, T, H * Q)


# T below one tile, one tile and a ragged last tile; 1 and 3 query heads.
@pytest.mark.parametrize("T, H", [(5, 3), (TILE, 1), (2 * TILE + 7, 3)])
def test_values_and_gradients_equal_float64_attention(T, H):
    gen = torch.Generator().manual_seed(0)
    B, Q = 2, 8
    q, k, v = (
        torch.randn(B, heads, T, Q, dtype=torch.float64, generator=gen, requires_grad=True)
        for heads in (H, 1, 1)
    )
    want = reference_attention(q, k, v)
    got = causal_mqa(q, k, v)
    assert got.shape == (B, T, H * Q)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    want_grads = torch.autograd.grad(want, (q, k, v), upstream)
    got_grads = torch.autograd.grad(got, (q, k, v), upstream)
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12, msg=name)


def test_float32_matches_torch_sdpa():
    gen = torch.Generator().manual_seed(1)
    B, H, T, Q = 2, 4, 100, 16
    q = torch.randn(B, T, H, Q, generator=gen).transpose(1, 2)  # the block's (B, T, H, Q) order
    k, v = torch.randn(B, 1, T, Q, generator=gen), torch.randn(B, 1, T, Q, generator=gen)
    sdpa = F.scaled_dot_product_attention(
        q, k.expand(B, H, T, Q), v.expand(B, H, T, Q), is_causal=True
    )
    torch.testing.assert_close(causal_mqa(q, k, v), sdpa.transpose(1, 2).reshape(B, T, H * Q))


def test_gradcheck():
    q = torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 6, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(causal_mqa, (q, k, v))


def test_kept_probabilities_count_and_the_memory_rule():
    # n full tiles keep H * TILE^2 * (1 + 2 + ... + n) probabilities: the causal half and the
    # diagonal blocks' upper halves.
    n, H = 4, 3
    assert saved_probs_per_sequence(n * TILE, H) == H * TILE**2 * n * (n + 1) // 2
    assert saved_probs_per_sequence(10, H) == H * 10 * 10
    # The rule: no more than the fused rows (T, rows) of the layer.
    T = 4 * TILE
    fits_exactly = saved_probs_per_sequence(T, H) // T
    assert fits_saved_probs(T, H, fits_exactly)
    assert not fits_saved_probs(T, H, fits_exactly - 1)


def test_eager_training_takes_the_tiles_and_matches_sdpa(monkeypatch):
    """A float64 model's loss and gradients are the same with the tiles and with SDPA; eager
    training uses the tiles, multi-head attention and long sequences (too many probabilities
    to keep) use SDPA."""
    torch.manual_seed(0)
    model = PaLM(CONFIG).double()
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 80))  # two tiles, the second ragged
    loss = model(tokens, targets=tokens).loss
    assert "_CausalMQABackward" in node_names(loss)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    monkeypatch.setattr(palm.model, "tiles_serve", lambda *args: False)
    sdpa_loss = model(tokens, targets=tokens).loss
    assert "_CausalMQABackward" not in node_names(sdpa_loss)
    sdpa_grads = torch.autograd.grad(sdpa_loss, list(model.parameters()))
    torch.testing.assert_close(loss, sdpa_loss, rtol=1e-13, atol=1e-13)
    for got, want in zip(grads, sdpa_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    monkeypatch.undo()
    multi_head = PaLM(dataclasses.replace(CONFIG, multi_query=False))
    assert "_CausalMQABackward" not in node_names(multi_head(tokens, targets=tokens).loss)
    # 16 heads x 80 positions: more probabilities per position than the layer's fused rows.
    many_heads = dataclasses.replace(CONFIG, n_heads=16, head_dim=2)
    assert not fits_saved_probs(80, 16, sum(PaLM(many_heads).blocks[0].row_sizes))
    assert "_CausalMQABackward" not in node_names(PaLM(many_heads)(tokens, targets=tokens).loss)


def test_compiled_training_calls_the_custom_op_and_matches_eager():
    """Under torch.compile the tiles run as the palm::causal_mqa custom op (no graph break in
    the block): the loss and gradients equal eager's."""
    torch.manual_seed(0)
    model = PaLM(CONFIG).double()
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 80))

    def loss_of(m, t):
        return m(t, targets=t).loss

    loss = loss_of(model, tokens)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    explained = torch._dynamo.explain(loss_of)(model, tokens)
    targets = {str(node.target) for g in explained.graphs for node in g.graph.nodes}
    assert "palm.causal_mqa.default" in targets
    torch._dynamo.reset()
    compiled_loss = torch.compile(loss_of)(model, tokens)
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-12, atol=1e-12)
    for got, want in zip(compiled_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_the_pool_lends_one_buffer_per_graph():
    """Eager steps reuse the probabilities' buffer; a second forward before the first graph's
    backward gets its own, and a model in another dtype drops the old ones."""
    torch.manual_seed(0)
    model = PaLM(CONFIG)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 80))
    pool = model.blocks[0].probs_pool
    model(tokens, targets=tokens).loss.backward()
    (first,) = pool
    model(tokens, targets=tokens).loss.backward()
    assert len(pool) == 1 and pool[0] is first  # the same buffer again
    losses = [model(tokens, targets=tokens).loss for _ in range(2)]  # two graphs alive
    assert len(pool) == 0
    sum(losses).backward()
    assert len(pool) == 2 and any(b is first for b in pool)
    model.double()(tokens, targets=tokens).loss.backward()
    assert len(pool) == 1 and pool[0].dtype == torch.float64


DTENSOR_CHECK = """
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from palm.attention_autograd import tiles_serve
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
q = torch.randn(2, 4, 16, 8, requires_grad=True)
sharded = DTensor.from_local(q, mesh, [Replicate()])
torch.compiler.is_compiling = lambda: True  # what the model sees while dynamo traces it
print(tiles_serve(q, 64), tiles_serve(sharded, 64))
dist.destroy_process_group()
"""


def test_sharded_tensors_keep_sdpa_under_compile(tmp_path):
    """While compiling, plain queries take the custom op and DTensor ones (tensor parallelism)
    keep SDPA: the op has no sharding rule. Run apart: a process group is process-wide."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", DTENSOR_CHECK, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]
