"""PaLM's loss (§5): the fused output-projection + loss against float64 references."""

from __future__ import annotations

import pytest
import torch

from palm import ModelConfig, PaLM, linear_lm_loss, lm_loss
from palm.cpu_kernels import onednn_available

IGNORE = -100


def reference(hidden, weight, targets, z_loss_coef):
    """(loss, cross_entropy, z_loss) from the textbook formulas, in float64."""
    logits = hidden.double() @ weight.double().t()
    log_z = torch.logsumexp(logits, -1)
    keep = targets != IGNORE
    target_logit = logits.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ce = (log_z - target_logit)[keep].mean()
    z = z_loss_coef * (log_z[keep] ** 2).mean()
    return ce + z, ce, z


def problem(n=37, d=12, v=53, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=generator, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=generator, dtype=dtype) * 2).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=generator)
    targets[[1, n // 3, n // 3 + 1]] = IGNORE
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 1000])
@pytest.mark.parametrize("z_loss_coef", [0.0, 0.1])
def test_values_and_gradients_match_float64_reference(chunk, z_loss_coef):
    hidden, weight, targets = problem()
    out = linear_lm_loss(hidden, weight, targets, z_loss_coef, chunk_tokens=chunk)
    (out.loss * 3.0).backward()  # a non-unit incoming gradient, as gradient accumulation gives
    got_h, got_w = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    want, want_ce, want_z = reference(hidden, weight, targets, z_loss_coef)
    (want * 3.0).backward()
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.cross_entropy, want_ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.z_loss, want_z, rtol=1e-12, atol=1e-12)
    assert out.n_tokens.item() == 34
    torch.testing.assert_close(got_h, hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_w, weight.grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    hidden, weight, targets = problem(n=9, d=4, v=7)
    loss = lambda h, w: linear_lm_loss(h, w, targets, 0.3, chunk_tokens=4).loss  # noqa: E731
    assert torch.autograd.gradcheck(loss, (hidden, weight))


def test_agrees_with_lm_loss_on_full_logits_in_float32():
    hidden, weight, targets = problem(n=64, d=32, v=211, dtype=torch.float32)
    hidden3, targets3 = hidden.view(4, 16, 32), targets.view(4, 16)
    fused = linear_lm_loss(hidden3, weight, targets3, 1e-4, chunk_tokens=24)
    fused.loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    full = lm_loss(hidden3 @ weight.t(), targets3, 1e-4)
    full.loss.backward()
    for a, b in zip(fused, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-7)


def test_no_grad_and_frozen_weight():
    hidden, weight, targets = problem()
    want = reference(hidden, weight, targets, 1e-4)[0]
    with torch.no_grad():
        out = linear_lm_loss(hidden, weight, targets, 1e-4, chunk_tokens=8)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, want.detach())
    weight.requires_grad_(False)
    linear_lm_loss(hidden, weight, targets, 1e-4, chunk_tokens=8).loss.backward()
    assert weight.grad is None and hidden.grad is not None
    # Reported parts are values, not something to differentiate: only `loss` is.
    out = linear_lm_loss(hidden, weight, targets, 1e-4)
    assert out.loss.requires_grad and not out.cross_entropy.requires_grad


def test_all_targets_ignored_gives_zero_not_nan():
    hidden, weight, targets = problem()
    out = linear_lm_loss(hidden, weight, torch.full_like(targets, IGNORE))
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.n_tokens.item() == 0
    assert hidden.grad.abs().sum() == 0 and torch.isfinite(weight.grad).all()


def test_model_loss_equals_loss_of_logits_without_whole_logits_saved():
    config = ModelConfig(vocab_size=301, d_model=32, n_layers=2, n_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = PaLM(config)
    tokens = torch.randint(0, 301, (3, 20))
    targets = torch.randint(0, 301, (3, 20))
    targets[0, :4] = IGNORE
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens, targets=targets, z_loss_coef=1e-4)
    out.loss.backward()
    fused = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    full = lm_loss(model(tokens), targets, z_loss_coef=1e-4)
    full.loss.backward()
    torch.testing.assert_close(out.loss, full.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.cross_entropy, full.cross_entropy, rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # Nothing of (B, T, vocab) size is kept for backward: that is the point of fusing.
    assert max(s.numel() for s in saved if 301 in s) < 3 * 20 * 301


def test_bfloat16_autocast_matmuls_stay_close_to_float32():
    config = ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = PaLM(config)
    tokens = torch.randint(0, 300, (2, 16))
    want = lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(tokens[:, :-1], targets=tokens[:, 1:])
    got.loss.backward()
    assert got.loss.dtype == torch.float32
    assert got.loss.item() == pytest.approx(want.item(), rel=2e-2)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_torch_compile_gives_the_same_loss_and_gradients():
    """train.compile=true compiles the model; the fused loss runs eagerly inside it (no unroll)."""
    config = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = PaLM(config)
    tokens = torch.randint(0, 257, (2, 33))
    eager = model(tokens[:, :-1], targets=tokens[:, 1:])
    eager.loss.backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model)(tokens[:, :-1], targets=tokens[:, 1:])
    compiled.loss.backward()
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.z_loss, eager.z_loss, rtol=1e-5, atol=1e-9)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_strided_hidden_and_int32_targets():
    hidden, weight, targets = problem(n=24)
    wide = torch.stack((hidden, hidden), dim=-1).flatten(1).detach().requires_grad_()
    strided = wide[:, ::2]  # every other column: the same values as hidden, not contiguous
    out = linear_lm_loss(strided, weight, targets.to(torch.int32), 1e-4, chunk_tokens=5)
    out.loss.backward()
    want = reference(hidden, weight, targets, 1e-4)[0]
    want.backward()
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(wide.grad[:, ::2], hidden.grad)
    assert wide.grad[:, 1::2].abs().sum() == 0


def test_token_scores_match_whole_logits_in_any_chunking():
    from palm.loss import token_scores

    torch.manual_seed(0)
    hidden, weight = (
        torch.randn(3, 37, 16, dtype=torch.float64),
        torch.randn(50, 16, dtype=torch.float64),
    )
    targets = torch.randint(0, 50, (3, 37))
    targets[0, :5] = -100
    logits = hidden @ weight.T
    expected = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none"
    ).view(3, 37)
    for rows in (1, 7, 64, 1000):
        nll, greedy = token_scores(hidden, weight, targets, chunk_tokens=rows)
        torch.testing.assert_close(nll.double(), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(greedy[targets != -100], (logits.argmax(-1) == targets)[targets != -100])
        assert bool(greedy[0, :5].all()) and float(nll[0, :5].abs().sum()) == 0.0


def test_scoring_at_palms_vocabulary_never_holds_the_logits():
    """Perplexity at vocab 256k over 4 x 1024 tokens: the whole float32 logits would be 4.2 GB;
    the peak of live tensors stays under four chunks of logits plus the model's own tensors."""
    from palm.flops import chunk_tokens_for
    from palm.perplexity import score_documents
    from palm.profiling import peak_tensor_bytes

    vocab = 256_000
    config = ModelConfig(
        vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, head_dim=8, max_seq_len=1024
    )
    model = PaLM(config).eval()
    docs = [torch.randint(0, vocab, (1023,)).tolist() for _ in range(4)]
    scores = []
    peak = peak_tensor_bytes(lambda: scores.extend(score_documents(model, docs, 0, 1024, 1024, 4)))
    chunk_logits = chunk_tokens_for(vocab) * vocab * 4  # 524 MB on a CPU
    assert peak <= 4 * chunk_logits + 64 * 2**20, peak
    assert peak < 4 * 1024 * vocab * 4 / 3  # far below one copy of the whole logits
    assert [n for _, n in scores] == [1023] * 4 and all(nll > 0 for nll, _ in scores)


def test_lm_loss_keeps_float64_so_gradcheck_works():
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 0] = -100
    assert lm_loss(logits, targets).loss.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: lm_loss(x, targets, z_loss_coef=0.3).loss, (logits,))


def test_confident_wrong_predictions_stay_finite_in_float32():
    """Logits 300 apart: float32 p(target) underflows to 0, yet -log p(target) and log Z are the
    float64 values (those rows' log Z is made again from their logits, and on an accelerator
    from the largest probability, which never underflows)."""
    hidden, weight, targets = problem(n=24, d=8, v=40, dtype=torch.float64)
    hidden = (hidden.detach() * 60).requires_grad_()
    want, want_ce, want_z = reference(hidden, weight, targets, 1e-4)
    h32, w32 = (t.detach().float().requires_grad_() for t in (hidden, weight))
    out = linear_lm_loss(h32, w32, targets, 1e-4, chunk_tokens=7)
    logits = h32.detach() @ w32.detach().t()
    spread = (logits.amax(-1) - logits.gather(-1, targets.clamp(min=0)[:, None])[:, 0]).max()
    assert spread > 200  # exp(-200) is 0 in float32: the target's probability underflows
    torch.testing.assert_close(out.cross_entropy.double(), want_ce, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.z_loss.double(), want_z, rtol=1e-5, atol=0)
    out.loss.backward()
    (want * 1.0).backward()
    torch.testing.assert_close(h32.grad.double(), hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w32.grad.double(), weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sync_free", [False, True])
def test_in_place_softmax_nll_and_log_z_both_ways(sync_free):
    """The chunk's softmax written over its logits, -log p(target) and log Z, by the host check
    (CPU) and by the largest logit and probability (what accelerators run), against float64,
    with some targets whose float32 probability underflows."""
    from palm.loss import _softmax_nll_log_z_

    generator = torch.Generator().manual_seed(3)
    logits64 = torch.randn(16, 50, generator=generator, dtype=torch.float64) * 4
    targets = torch.randint(0, 50, (16,), generator=generator)
    logits64[[2, 9], targets[[2, 9]]] -= 400.0  # p(target) = exp(-400...): 0 in float32
    remade = []

    def logits_of_rows(rows):
        remade.append(rows.tolist())
        return logits64[rows].float()

    block = logits64.float()
    probs, nll, log_z = _softmax_nll_log_z_(block, targets, logits_of_rows, sync_free=sync_free)
    want_log_z = torch.logsumexp(logits64, -1)
    want_nll = want_log_z - logits64.gather(-1, targets[:, None])[:, 0]
    assert probs.data_ptr() == block.data_ptr()  # written over the logits
    torch.testing.assert_close(probs.double(), torch.softmax(logits64, -1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(log_z.double(), want_log_z, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(nll.double(), want_nll, rtol=1e-6, atol=1e-5)
    assert remade == ([] if sync_free else [[2, 9]])


@pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize(("rows", "vocab", "kernel"), [(64, 300, "onednn"), (4096, 1100, "mkl")])
def test_cpu_logits_kernel_by_block_size_matches_float64(rows, vocab, kernel):
    """On CPU in float32 oneDNN makes logits blocks of up to 16 MiB (palm.cpu_kernels), MKL's
    mm larger ones (4096 x 1100 floats: 17.2 MiB); either way the loss and its gradients are the
    float64 reference's to float32 precision."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    names = set()
    hidden, weight, targets = problem(n=rows, d=8, v=vocab, dtype=torch.float32)
    weight = torch.nn.Parameter(weight.detach())  # as the model's embedding is
    with Ops():
        out = linear_lm_loss(hidden, weight, targets, 1e-2, chunk_tokens=rows)
    assert ("_linear_pointwise" in names) == (kernel == "onednn"), names
    out.loss.backward()
    got = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    want = reference(hidden, weight, targets, 1e-2)
    want[0].backward()
    for a, b in zip(out[:3], want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0].double(), hidden.grad.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[1].double(), weight.grad.double(), rtol=1e-4, atol=1e-6)
