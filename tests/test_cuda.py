"""On a CUDA GPU (skipped elsewhere; `pytest -m cuda`, run by benchmarks/gpu_check.sh): bf16
training steps, the key/value cache, the fused loss and FSDP2 on one rank behave as on the CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from palm import ModelConfig, PaLM, lm_loss
from palm.optim import PaLMAdafactor
from palm.sampling import generate

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CONFIG = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, head_dim=32)


def test_bf16_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = PaLM(CONFIG).cuda()
    optimizer = PaLMAdafactor(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 512, (8, 65), device="cuda")
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tokens[:, :-1], targets=tokens[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 1.0


def test_cached_decoding_equals_recomputation():
    torch.manual_seed(0)
    model = PaLM(CONFIG).cuda().eval()
    prompt = torch.randint(0, 512, (2, 12), device="cuda")
    cached = generate(model, prompt, 20, temperature=0.0)
    recomputed = generate(model, prompt, 20, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_fused_loss_matches_whole_logits_under_bf16():
    torch.manual_seed(0)
    model = PaLM(CONFIG).cuda()
    tokens = torch.randint(0, 512, (4, 129), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = model(tokens[:, :-1], targets=tokens[:, 1:])
        whole = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    torch.testing.assert_close(fused.loss, whole.loss, rtol=2e-2, atol=2e-2)


def test_fsdp2_on_one_rank_trains_like_the_plain_model(tmp_path, make_dataset, tiny_config):
    from palm.trainer import train

    data = make_dataset(tmp_path / "data")
    plain = train(tiny_config(data, tmp_path / "a", "train.device=cuda"))
    sharded = train(tiny_config(data, tmp_path / "b", "train.device=cuda", "train.parallel=fsdp"))
    assert plain.step == sharded.step == 8
    assert sharded.val_loss == pytest.approx(plain.val_loss, rel=1e-2)


def test_sdpa_never_falls_back_to_the_math_kernel_in_bf16():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = dataclasses.replace(CONFIG, n_heads=8, head_dim=64, d_model=512)
    model = PaLM(config).cuda()
    tokens = torch.randint(0, 512, (2, 256), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward()  # raises on fallback


def profiled_names(run) -> set[str]:
    """Names of every op and kernel (CPU and CUDA) that `run()` launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return {event.key for event in prof.key_averages()}


def test_eager_decoding_steps_build_no_cudnn_plans():
    # cuDNN attention plans each new key length: ~2 ms of CPU per layer per token on an H200.
    torch.manual_seed(0)
    model = PaLM(CONFIG).cuda().eval()
    prompt = torch.randint(0, 512, (2, 12), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        cache = model.new_cache(2, 32)
        model(prompt, cache)
        token = prompt[:, -1:]
        names = profiled_names(lambda: [model(token, cache) for _ in range(3)])
    assert cache.length == 15
    plan_free = (
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_efficient_attention",
    )
    assert any(name.startswith(plan_free) for name in names), sorted(names)
    assert not [name for name in names if "cudnn" in name.lower()]


def test_compiled_decoding_replays_cuda_graphs_and_equals_eager():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = PaLM(CONFIG).cuda().eval()
    first, second = (torch.randint(0, 512, (2, 12), device="cuda") for _ in range(2))
    eager = [generate(model, prompt, 24, temperature=0.0) for prompt in (first, second)]
    compiled = generate(model, first, 24, temperature=0.0, compile=True)  # compiles, records
    assert torch.equal(compiled, eager[0])
    graphs = counters["stats"]["unique_graphs"]
    # Another request, another prompt, a new cache: the graph must write this request's cache
    # (recorded again where its addresses are new), never recompiled.
    names = profiled_names(lambda: generate(model, second, 24, temperature=0.0, compile=True))
    assert "cudaGraphLaunch" in names
    held = torch.empty(1 << 20, device="cuda")  # so the next cache lands at new addresses
    again = generate(model, second, 24, temperature=0.0, compile=True)
    del held
    assert torch.equal(again, eager[1])
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_compiled_decoder_records_its_cuda_graph_once(monkeypatch):
    """CompiledDecoder (interactive --compile): later requests, of other prompt lengths, replay
    the graph recorded for the first one in its long-lived cache; a new cache per request would
    record again each time, toward torch's re-record limit (past it, silently no graphs)."""
    from torch._inductor import cudagraph_trees

    from palm.compiled_decoding import CompiledDecoder

    manager = cudagraph_trees.CUDAGraphTreeManager
    if not hasattr(manager, "record_function"):
        pytest.skip("this torch's CUDA graph trees have no record_function to count")
    recorded, original = [], manager.record_function
    monkeypatch.setattr(
        manager,
        "record_function",
        lambda self, *a, **k: recorded.append(1) or original(self, *a, **k),
    )
    torch.manual_seed(0)
    model = PaLM(CONFIG).cuda().eval()
    decoder = CompiledDecoder(model)
    counts = []
    for length in (12, 5, 9):
        prompt = torch.randint(0, 512, (2, length), device="cuda")
        expected = generate(model, prompt, 24, temperature=0.0)
        got = generate(model, prompt, 24, temperature=0.0, compile=True, cache_len=40,
                       decoder=decoder)  # fmt: skip
        assert torch.equal(got, expected)
        counts.append(len(recorded))
    assert counts[0] >= 1 and counts[1:] == [counts[0]] * 2, counts
