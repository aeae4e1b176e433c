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


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs, ref_kwargs",
    [
        ({}, {}),  # PaLM's settings
        (
            {"beta1": None, "clip_threshold": None, "multiply_by_parameter_scale": False},
            {"beta1": None, "clip_threshold": None, "scale": False},
        ),
    ],
)
def test_compiled_update_matches_float64_reference_with_one_graph(kwargs, ref_kwargs):
    """The torch.compile'd update (train.compile) is the same T5X math, and the lr and beta2_k
    that change every step are graph inputs: one compilation serves all eight steps."""
    import torch._dynamo

    torch._dynamo.reset()
    params, grads = make_problem(1, zero=(2,))
    with torch._dynamo.config.patch(error_on_recompile=True):
        ours, opt = run_ours(params, grads, LRS, compiled=True, **kwargs)
    ref_p, ref_m, ref_v = reference_adafactor(params, grads, LRS, **ref_kwargs)
    for t, p, v in zip(ours, ref_p, ref_v):
        np.testing.assert_allclose(t.detach().double().numpy(), p, rtol=2e-6, atol=1e-9)
        np.testing.assert_allclose(opt.state[t]["exp_avg_sq"].double().numpy(), v, rtol=2e-6)


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


@pytest.mark.cuda
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


def test_lr_zero_step_on_zero_grads_only_creates_state():
    """torch.distributed.checkpoint's `_init_optim_state` (run by get/set_optimizer_state_dict on
    an optimizer without state) steps at lr = 0 with all-zero gradients: the parameters must not
    move, even with a constant weight decay or eps1 = 0 (0/0), and the step does not count."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(3,), (2, 4)]]
    before = [p.detach().clone() for p in params]
    opt = PaLMAdafactor(params, lr=0.0, weight_decay=0.01, eps1=0.0)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
        state = opt.state[p]
        assert int(state["step"]) == 0
        assert not state["exp_avg_sq"].any() and not state["exp_avg"].any()
    # A real step at lr = 0 (non-zero gradients, e.g. warm-up from 0) still updates the state.
    fresh = torch.nn.Parameter(torch.ones(3))
    opt = PaLMAdafactor([fresh], lr=0.0, weight_decay=0.0)
    fresh.grad = torch.tensor([1.0, 0.0, -2.0])
    opt.step()
    assert int(opt.state[fresh]["step"]) == 1 and torch.equal(fresh, torch.ones(3))
    assert torch.equal(opt.state[fresh]["exp_avg_sq"], fresh.grad**2 + 1e-30)


# ---- DTensor / FSDP2: two gloo processes on CPU against one plain process ---------------------


def _fsdp_worker() -> None:
    """Run by each of the two ranks that `test_fsdp2_matches_single_process` starts."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from palm import ModelConfig, PaLM
    from palm.parallel import shard_blocks

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    kwargs = {"beta1": 0.9, "weight_decay": "lr^2", "clip_threshold": 0.5}
    lrs = [3e-2, 2e-2, 1e-2, 2e-2, 1e-2]
    # vocab 63: the tied embedding is sharded unevenly (32 + 31 rows).
    config = ModelConfig(vocab_size=63, d_model=32, n_layers=2, n_heads=2, head_dim=16)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 63, (2, 9), generator=gen) for _ in lrs]

    def make(shard):
        torch.manual_seed(0)
        model = PaLM(config)
        if shard:
            shard_blocks(model, mesh)  # palm's FSDP2 wrapping: keeps in_proj's row blocks
        return model, build_optimizer("adafactor", model.parameters(), **kwargs)

    def train(model, opt, steps):
        for i in steps:
            tokens = batches[i]
            logits = model(tokens[:, :-1]).float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            assert float(norm) > 0.05  # global gradient clipping is active
            opt.param_groups[0]["lr"] = lrs[i]
            opt.step()
            opt.zero_grad(set_to_none=True)

    def full_params(model):
        return {
            n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
            for n, p in model.named_parameters()
        }

    def assert_params_equal(a, b):
        a, b = full_params(a), full_params(b)
        assert a.keys() == b.keys()
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6, msg=n)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def assert_optim_equal(a, b):
        assert a["state"].keys() == b["state"].keys() and len(a["state"]) == 10
        for n in a["state"]:
            assert a["state"][n].keys() == b["state"][n].keys() == {"step", "exp_avg", "exp_avg_sq"}
            for key, value in a["state"][n].items():
                other = b["state"][n][key]
                assert type(value) is torch.Tensor and type(other) is torch.Tensor, (n, key)
                torch.testing.assert_close(value, other, rtol=1e-6, atol=1e-6, msg=f"{n} {key}")

    # 3 steps sharded == 3 steps in one process: parameters and the gathered optimizer state.
    ref, ref_opt = make(shard=False)
    train(ref, ref_opt, range(3))
    sharded, opt = make(shard=True)
    train(sharded, opt, range(3))
    for p in sharded.parameters():
        assert p.placements == (Shard(0),)
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].placements == (Shard(0),)
    assert_params_equal(sharded, ref)
    gathered = get_optimizer_state_dict(sharded, opt, options=full)  # on rank 0 only
    if rank == 0:
        assert_optim_equal(gathered, get_optimizer_state_dict(ref, ref_opt))
    box = [gathered]  # every rank loads the full state, as from a checkpoint file
    dist.broadcast_object_list(box, src=0)
    gathered = box[0]
    model_state = full_params(ref)

    # Load the gathered state into fresh optimizers (DCP first runs a dummy lr = 0 step on them,
    # which must not move the parameters): one process and 2-rank FSDP both continue identically.
    one, one_opt = make(shard=False)
    set_model_state_dict(one, model_state)
    set_optimizer_state_dict(one, one_opt, gathered)
    assert_params_equal(one, ref)
    two, two_opt = make(shard=True)
    set_model_state_dict(two, model_state, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(two, two_opt, gathered, options=StateDictOptions(full_state_dict=True))
    assert_params_equal(two, ref)
    # Without DCP: torch's plain state_dict (full tensors) loads into sharded params.
    three, three_opt = make(shard=True)
    set_model_state_dict(three, model_state, options=StateDictOptions(full_state_dict=True))
    three_opt.load_state_dict(ref_opt.state_dict())
    for p in three.parameters():
        assert {three_opt.state[p][key].placements for key in ("exp_avg", "exp_avg_sq")} == {
            (Shard(0),)
        }
    trained = [(ref, ref_opt), (sharded, opt), (one, one_opt), (two, two_opt), (three, three_opt)]
    for model, optim in trained:
        train(model, optim, range(3, 5))
    for model, _ in trained[1:]:
        assert_params_equal(model, ref)
    ref_state = get_optimizer_state_dict(ref, ref_opt)
    for model, optim in trained[1:]:
        state = get_optimizer_state_dict(model, optim, options=full)
        if rank == 0:
            assert_optim_equal(state, ref_state)

    # Bare DTensors: uneven Shard(0) (a rank may hold no rows) and Replicate, against plain tensors.
    params, grads = make_problem(4, shapes=[(5,), (1, 4), (7, 3), (), (4, 6)], steps=6)
    placements = [Shard(0), Shard(0), Shard(0), Replicate(), Replicate()]
    plain, plain_opt = run_ours(params, grads, LRS[:6], **kwargs)
    dts = [
        torch.nn.Parameter(distribute_tensor(torch.tensor(p, dtype=torch.float32), mesh, [pl]))
        for p, pl in zip(params, placements)
    ]
    dt_opt = PaLMAdafactor(dts, **kwargs)
    for lr, gs in zip(LRS[:6], grads):
        for t, g, pl in zip(dts, gs, placements):
            t.grad = distribute_tensor(torch.tensor(g, dtype=torch.float32), mesh, [pl])
        dt_opt.param_groups[0]["lr"] = lr
        dt_opt.step()
    for a, b, pl in zip(plain, dts, placements):
        torch.testing.assert_close(b.full_tensor(), a.detach(), rtol=0, atol=1e-6)
        for key, value in plain_opt.state[a].items():
            theirs = dt_opt.state[b][key]
            if key != "step":
                assert theirs.placements == (pl,)
                theirs = theirs.full_tensor()
            torch.testing.assert_close(theirs, value, rtol=1e-6, atol=1e-9)

    dist.destroy_process_group()
    print(f"rank {rank} ok", flush=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)
def test_fsdp2_matches_single_process():
    """FSDP2 (DTensor Shard(0)) over 2 gloo CPU ranks == one process: parameters after 3 steps
    with momentum, lr^2 weight decay and both clippings active; the full optimizer state that
    DCP gathers; and resuming from it into 1 process or 2 ranks. Also bare DTensors, uneven
    Shard(0) and Replicate."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0 and f"rank {rank} ok" in out, f"rank {rank}:\n{out[-6000:]}"


if __name__ == "__main__":  # one rank of test_fsdp2_matches_single_process
    _fsdp_worker()


def test_fused_weights_take_the_steps_of_separate_matrices():
    """PaLM's in_proj fuses q, k, v and both SwiGLU inputs; as in T5X, RMS(p) and RMS(u) are
    per matrix. A fused weight tagged with its row blocks and the same weights as five separate
    matrices, given the same gradients, take identical steps for 50 steps."""
    from palm import ModelConfig, PaLM
    from palm.optim import ROW_BLOCKS

    config = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, head_dim=16)
    in_proj = PaLM(config).blocks[0].in_proj.weight
    sizes = getattr(in_proj, ROW_BLOCKS)
    assert sizes == (32, 16, 16, 128, 128)  # q (2 x 16), one k and one v head, value, gate
    torch.manual_seed(0)
    # Unlike blocks, so that shared statistics would show: scale each block differently.
    start = torch.cat([torch.randn(r, 32) * (0.5 + i) for i, r in enumerate(sizes)])
    fused = torch.nn.Parameter(start.clone())
    setattr(fused, ROW_BLOCKS, sizes)
    untagged = torch.nn.Parameter(start.clone())
    separate = [torch.nn.Parameter(b.clone()) for b in start.split(sizes)]
    kwargs = {"lr": 1e-2, "beta1": 0.9, "weight_decay": "lr^2", "clip_threshold": 1.0}
    optimizers = [PaLMAdafactor([p], **kwargs) for p in (fused, untagged)]
    optimizers.append(PaLMAdafactor(separate, **kwargs))
    for _ in range(50):
        grad = torch.randn_like(start) * torch.rand(len(start), 1) * 3
        fused.grad, untagged.grad = grad.clone(), grad.clone()
        for p, g in zip(separate, grad.split(sizes)):
            p.grad = g.clone()
        for optimizer in optimizers:
            optimizer.step()
    together = torch.cat([p.detach() for p in separate])
    torch.testing.assert_close(fused.detach(), together, rtol=0, atol=1e-6)
    assert (untagged.detach() - together).abs().max() > 1e-3  # shared statistics do differ


def test_a_pickled_optimizer_keeps_compiled_and_remakes_the_function():
    import pickle

    params = [torch.nn.Parameter(torch.randn(3, 4))]
    for compiled in (False, True):
        copy = pickle.loads(pickle.dumps(PaLMAdafactor(params, compiled=compiled)))
        assert copy.compiled is compiled and copy._fused_update is None
