"""The block's one-node split + RoPE + SwiGLU (palm.block_autograd) against the plain ops."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from palm import ModelConfig, PaLM
from palm.block_autograd import split_rope_swiglu, to_heads
from palm.rope import apply_rope, rotary_tables

CONFIG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, head_dim=8, max_seq_len=16)


def plain_middle(fused, rope, row_sizes, head_dim):
    """What PaLMBlock computes without the node: split, apply_rope, Swish(gate) * value."""
    q, k, v, value, gate = fused.split(row_sizes, dim=-1)
    q = apply_rope(to_heads(q, head_dim), rope.q_cos, rope.q_sin)
    k = apply_rope(to_heads(k, head_dim), rope.k_cos, rope.k_sin)
    return q, k, to_heads(v, head_dim), F.silu(gate) * value


@pytest.mark.parametrize("n_kv_heads", [1, 4])  # multi-query (PaLM) and multi-head
@pytest.mark.parametrize("xpos", [0.0, 64.0])  # queries' tables differ from keys' under xPos
def test_values_and_gradients_equal_the_plain_ops_in_float64(n_kv_heads, xpos):
    config = dataclasses.replace(CONFIG, multi_query=n_kv_heads == 1, xpos_scale_base=xpos)
    T, Q = 16, config.head_dim
    rows = (4 * Q, n_kv_heads * Q, n_kv_heads * Q, 48, 48)
    gen = torch.Generator().manual_seed(0)
    fused = torch.randn(3, T, sum(rows), dtype=torch.float64, generator=gen, requires_grad=True)
    rope = rotary_tables(torch.arange(T), config, torch.float64)
    want = plain_middle(fused, rope, rows, Q)
    got = split_rope_swiglu(fused, rope, rows, Q)
    for w, g in zip(want, got, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-13)
    upstream = [torch.randn(w.shape, dtype=torch.float64, generator=gen) for w in want]
    (want_grad,) = torch.autograd.grad(want, fused, upstream)
    (got_grad,) = torch.autograd.grad(got, fused, upstream)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-13, atol=1e-13)
    # An output that gets no gradient (here v) counts as zero, as for the plain ops.
    want, got = plain_middle(fused, rope, rows, Q), split_rope_swiglu(fused, rope, rows, Q)
    (partial,) = torch.autograd.grad(got[0].sum() + got[3].sum(), fused)
    (partial_want,) = torch.autograd.grad(want[0].sum() + want[3].sum(), fused)
    torch.testing.assert_close(partial, partial_want, rtol=1e-13, atol=1e-13)


def test_gradcheck():
    T, Q = 5, 4
    rows = (2 * Q, Q, Q, 6, 6)
    config = dataclasses.replace(CONFIG, head_dim=Q)
    fused = torch.randn(2, T, sum(rows), dtype=torch.float64, requires_grad=True)
    rope = rotary_tables(torch.arange(T), config, torch.float64)
    assert torch.autograd.gradcheck(lambda f: split_rope_swiglu(f, rope, rows, Q), (fused,))


def node_names(loss: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


def test_eager_training_takes_the_node_and_matches_the_plain_block(monkeypatch):
    """A float64 model's loss and every parameter's gradient are the same with and without the
    node; eager training uses it, the serial ablation and GELU do not."""
    torch.manual_seed(0)
    model = PaLM(CONFIG).double()
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 16))
    loss = model(tokens, targets=tokens).loss
    assert "_SplitRopeSwiGLUBackward" in node_names(loss)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    monkeypatch.setattr(type(model.blocks[0]), "one_node_middle", lambda *args: False)
    plain_loss = model(tokens, targets=tokens).loss
    assert "_SplitRopeSwiGLUBackward" not in node_names(plain_loss)
    plain_grads = torch.autograd.grad(plain_loss, list(model.parameters()))
    torch.testing.assert_close(loss, plain_loss, rtol=1e-13, atol=1e-13)
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)
    monkeypatch.undo()
    for switch in (dict(parallel_block=False), dict(activation="gelu")):
        other = PaLM(dataclasses.replace(CONFIG, **switch))
        names = node_names(other(tokens, targets=tokens).loss)
        assert "_SplitRopeSwiGLUBackward" not in names, switch


def test_bf16_rows_with_float32_tables_match_the_plain_ops():
    """bf16 autocast: bf16 rows, float32 tables. The node's outputs are apply_rope's exactly
    (float32 math, one rounding), and its gradient is as close to float64's as the plain ops'."""
    T, Q = 16, CONFIG.head_dim
    rows = (4 * Q, Q, Q, 48, 48)
    gen = torch.Generator().manual_seed(0)
    fused64 = torch.randn(3, T, sum(rows), dtype=torch.float64, generator=gen)
    fused = fused64.bfloat16().requires_grad_()
    rope = rotary_tables(torch.arange(T), CONFIG, torch.float32)
    want = plain_middle(fused, rope, rows, Q)
    got = split_rope_swiglu(fused, rope, rows, Q)
    for w, g in zip(want, got, strict=True):
        assert g.dtype == w.dtype == torch.bfloat16 and torch.equal(g, w)
    upstream = [torch.randn(w.shape, generator=gen).bfloat16() for w in want]
    exact = fused.detach().double().requires_grad_()
    rope64 = rotary_tables(torch.arange(T), CONFIG, torch.float64)
    reference = torch.autograd.grad(
        plain_middle(exact, rope64, rows, Q), exact, [u.double() for u in upstream]
    )[0]
    errors = [
        (torch.autograd.grad(out, fused, upstream)[0].double() - reference).abs().max()
        for out in (want, got)
    ]
    assert errors[1] <= errors[0] * 1.01, errors


def test_bf16_autocast_takes_the_node_and_matches_the_plain_block(monkeypatch):
    torch.manual_seed(0)
    model = PaLM(CONFIG)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 16))

    def loss_and_grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens, targets=tokens).loss
        return loss, node_names(loss), torch.autograd.grad(loss, list(model.parameters()))

    loss, names, grads = loss_and_grads()
    assert "_SplitRopeSwiGLUBackward" in names
    monkeypatch.setattr(type(model.blocks[0]), "one_node_middle", lambda *args: False)
    plain_loss, plain_names, plain_grads = loss_and_grads()
    assert "_SplitRopeSwiGLUBackward" not in plain_names
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
