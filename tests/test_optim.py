"""PaLM §5 Adafactor: a float64 reference, torch's Adafactor as a peer, resume and edge cases."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from palm.optim import PaLMAdafactor, build_optimizer

SHAPES = [(), (7,), (4, 6), (2, 3, 5)]


def reference_adafactor(
    params,
    grads,
    lrs,
    *,
    beta1=0.9,
    decay_exponent=0.8,
    eps1=1e-30,
    eps2=1e-3,
    clip_threshold=1.0,
    wd=lambda lr: lr**2,
    scale=True,
):
    """T5X's Adafactor (factored=False), written plainly in float64 numpy, one step per lr."""

    def rms(x):
        return math.sqrt(float(np.mean(x * x)))

    params = [np.array(p, dtype=np.float64) for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for k, lr in enumerate(lrs, start=1):
        beta2 = 1.0 - k ** (-decay_exponent)
        for i, p in enumerate(params):
            g = np.asarray(grads[k - 1][i], dtype=np.float64)
            v[i] = beta2 * v[i] + (1.0 - beta2) * (g * g + eps1)
            u = g / np.sqrt(v[i])
            if clip_threshold is not None:
                u = u / max(1.0, rms(u) / clip_threshold)
            step = lr * (max(rms(p), eps2) if scale else 1.0) * u
            if beta1:
                m[i] = beta1 * m[i] + (1.0 - beta1) * step
                step = m[i]
            params[i] = (1.0 - wd(lr)) * p - step
    return params, m, v


def make_problem(seed, shapes=SHAPES, steps=8, zero=()):
    """float32 initial params and per-step grads (as float64 arrays holding float32 values)."""
    rng = np.random.default_rng(seed)
    params = [np.zeros(s) if i in zero else rng.normal(size=s) for i, s in enumerate(shapes)]
    params = [p.astype(np.float32).astype(np.float64) for p in params]
    # Gradients of very different scales per tensor, so RMS scaling and clipping both matter.
    grads = [
        [
            (rng.normal(size=s) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32).astype(np.float64)
            for s in shapes
        ]
        for _ in range(steps)
    ]
    return params, grads


def run_ours(params, grads, lrs, **kwargs):
    tensors = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float32)) for p in params]
    opt = PaLMAdafactor(tensors, **kwargs)
    for lr, gs in zip(lrs, grads):
        for t, g in zip(tensors, gs):
            t.grad = torch.tensor(g, dtype=torch.float32)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    return tensors, opt


LRS = [1e-2, 1e-2, 8e-3, 5e-3, 5e-3, 3e-2, 1e-3, 2e-3]


@pytest.mark.parametrize(
    "kwargs, ref_kwargs",
    [
        ({}, {}),  # PaLM defaults: beta1 0.9, clip 1.0, weight decay lr^2
        ({"weight_decay": 0.0}, {"wd": lambda lr: 0.0}),
        ({"weight_decay": 0.01}, {"wd": lambda lr: 0.01}),
        ({"weight_decay": "lr^1.5"}, {"wd": lambda lr: lr**1.5}),
        ({"beta1": None}, {"beta1": None}),
        ({"clip_threshold": 0.5}, {"clip_threshold": 0.5}),  # clips at every step
        ({"clip_threshold": None}, {"clip_threshold": None}),
        ({"multiply_by_parameter_scale": False}, {"scale": False}),
        ({"decay_exponent": 0.5, "eps2": 1e-1}, {"decay_exponent": 0.5, "eps2": 1e-1}),
    ],
)
def test_matches_float64_reference(kwargs, ref_kwargs):
    params, grads = make_problem(0, zero=(2,))
    ours, opt = run_ours(params, grads, LRS, **kwargs)
    ref_p, ref_m, ref_v = reference_adafactor(params, grads, LRS, **ref_kwargs)
    for t, p, m, v in zip(ours, ref_p, ref_m, ref_v):
        np.testing.assert_allclose(t.detach().double().numpy(), p, rtol=2e-6, atol=1e-9)
        state = opt.state[t]
        assert int(state["step"]) == len(LRS)
        np.testing.assert_allclose(state["exp_avg_sq"].double().numpy(), v, rtol=2e-6)
        if kwargs.get("beta1", 0.9):
            # m sums updates of both signs: judge its error against the tensor's own scale.
            np.testing.assert_allclose(
                state["exp_avg"].double().numpy(), m, rtol=2e-6, atol=2e-6 * np.abs(m).max()
            )
        else:
            assert "exp_avg" not in state


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, "lr^2"])
def test_matches_torch_adafactor(foreach, weight_decay):
    """torch.optim.Adafactor does not factorise vectors and has no momentum: in that regime
    (beta1 off, lr <= 1/sqrt(k) so its rho = lr) it is our update. Its decay is
    (1 - lr * weight_decay), so weight_decay=lr (constant lr) is our lr^2."""
    lr = 1e-2
    params, grads = make_problem(1, shapes=[(5,), (16,), (1,), (3,)], steps=10, zero=(3,))
    ours, _ = run_ours(params, grads, [lr] * 10, beta1=None, weight_decay=weight_decay)
    theirs = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float32)) for p in params]
    opt = torch.optim.Adafactor(
        theirs,
        lr=lr,
        beta2_decay=-0.8,
        eps=(1e-30, 1e-3),
        d=1.0,
        weight_decay=0.0 if weight_decay == 0.0 else lr,
        foreach=foreach,
    )
    for gs in grads:
        for t, g in zip(theirs, gs):
            t.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_state_dict_round_trip_is_bit_identical():
    """Resume mid-training from a weights_only checkpoint == never stopping (PaLM §5)."""
    params, grads = make_problem(2, steps=6)

    def fresh(values):
        return [
            torch.nn.Parameter(torch.tensor(np.asarray(p), dtype=torch.float32)) for p in values
        ]

    def steps(opt, tensors, gs, lrs):
        for lr, step_grads in zip(lrs, gs):
            for t, g in zip(tensors, step_grads):
                t.grad = torch.tensor(g, dtype=torch.float32)
            opt.param_groups[0]["lr"] = lr
            opt.step()

    straight = fresh(params)
    opt = PaLMAdafactor(straight)
    steps(opt, straight, grads, LRS)

    first = fresh(params)
    opt1 = PaLMAdafactor(first)
    steps(opt1, first, grads[:3], LRS[:3])
    buf = io.BytesIO()
    torch.save({"params": [t.detach() for t in first], "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # plain tensors and numbers only
    resumed = [torch.nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt2 = PaLMAdafactor(resumed, weight_decay=0.5)  # hyperparameters come from the checkpoint
    opt2.load_state_dict(ckpt["optim"])
    assert opt2.param_groups[0]["weight_decay_lr_power"] == 2.0
    steps(
        opt1, first, grads[3:], LRS[3:]
    )  # the original keeps going: must not share state with opt2
    steps(opt2, resumed, grads[3:], LRS[3:])
    for a, b, c in zip(straight, first, resumed):
        assert torch.equal(a, b) and torch.equal(a, c)
    for p_ref, p_res in zip(straight, resumed):
        for key, value in opt.state[p_ref].items():
            assert torch.equal(value, opt2.state[p_res][key])


def test_low_precision_params_keep_float32_state_through_load():
    p = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    opt = PaLMAdafactor([p])
    p.grad = torch.randn(4, 4, dtype=torch.bfloat16)
    opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = PaLMAdafactor([q])
    opt2.load_state_dict(opt.state_dict())
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt2.state[q][key].dtype == torch.float32
        assert torch.equal(opt2.state[q][key], opt.state[p][key])
    assert p.dtype == torch.bfloat16
    opt.step()  # loaded state is a copy: stepping the source leaves it alone
    assert int(opt2.state[q]["step"]) == 1 and int(opt.state[p]["step"]) == 2


def test_parameter_scale_floor_moves_zero_initialised_params():
    """RMS(0) = 0: without the 1e-3 floor (PaLM §5) a zero-initialised tensor never moves."""
    g = torch.tensor([0.3, -2.0, 1e-4, 5.0])
    moved = torch.nn.Parameter(torch.zeros(4))
    stuck = torch.nn.Parameter(torch.zeros(4))
    opt = PaLMAdafactor([moved], lr=1e-2)
    opt_no_floor = PaLMAdafactor([stuck], lr=1e-2, eps2=0.0)
    moved.grad, stuck.grad = g.clone(), g.clone()
    opt.step()
    opt_no_floor.step()
    # Step 1: v = g^2 (+1e-30), u = sign(g) with RMS 1 (no clipping), m = 0.1 * lr * 1e-3 * u.
    torch.testing.assert_close(moved.detach(), -0.1 * 1e-2 * 1e-3 * torch.sign(g))
    assert torch.count_nonzero(stuck) == 0


def test_params_without_grad_are_skipped_and_count_their_own_steps():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = PaLMAdafactor([a, b])
    for i in range(3):
        a.grad = torch.ones(3)
        b.grad = torch.ones(3) if i != 1 else None
        before = b.detach().clone()
        opt.step()
        if i == 1:
            assert torch.equal(b, before)
    assert int(opt.state[a]["step"]) == 3 and int(opt.state[b]["step"]) == 2


def test_rejects_bad_arguments():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="lr\\^<power>"):
        PaLMAdafactor(p, weight_decay="lr**2")
    with pytest.raises(ValueError, match="beta1"):
        PaLMAdafactor(p, beta1=1.0)
    with pytest.raises(ValueError, match="clip_threshold"):
        PaLMAdafactor(p, clip_threshold=0.0)


def test_build_optimizer():
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3)
    )
    model[1].bias.requires_grad_(False)
    adamw = build_optimizer("adamw", model.parameters(), lr=1e-3, weight_decay=0.2)
    assert isinstance(adamw, torch.optim.AdamW)
    decayed, plain = adamw.param_groups
    assert decayed["weight_decay"] == 0.2 and plain["weight_decay"] == 0.0
    assert {p.dim() for p in decayed["params"]} == {2} and len(decayed["params"]) == 2
    assert {p.dim() for p in plain["params"]} == {1} and len(plain["params"]) == 2  # no frozen
    assert decayed["betas"] == (0.9, 0.95)
    ada = build_optimizer("adafactor", model.parameters(), weight_decay=0.0)
    assert isinstance(ada, PaLMAdafactor) and ada.param_groups[0]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="adafactor, adamw"):
        build_optimizer("sgd", model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    """The fused foreach kernels on GPU (0-D per-tensor scales broadcast) give the CPU result."""
    params, grads = make_problem(3)
    cpu, _ = run_ours(params, grads, LRS)
    tensors = [
        torch.nn.Parameter(torch.tensor(p, dtype=torch.float32, device="cuda")) for p in params
    ]
    opt = PaLMAdafactor(tensors)
    for lr, gs in zip(LRS, grads):
        for t, g in zip(tensors, gs):
            t.grad = torch.tensor(g, dtype=torch.float32, device="cuda")
        opt.param_groups[0]["lr"] = lr
        opt.step()
    for a, b in zip(cpu, tensors):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-6, atol=1e-9)
