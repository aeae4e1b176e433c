"""Counting (parameters, PaLM Appendix B FLOPs, MFU) and the `palm info` command."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from palm import PRESETS, ModelConfig, PaLM
from palm.flops import flops_per_token, mfu, parameter_counts, training_memory_bytes


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("palm-5")])
@pytest.mark.parametrize(
    "ablation",
    [
        {},
        {"parallel_block": False, "multi_query": False},
        {"activation": "gelu", "tie_embeddings": False},
    ],
)
def test_analytic_counts_equal_the_built_model(name, ablation):
    config = dataclasses.replace(ModelConfig.preset(name), **ablation)
    with torch.device("meta"):
        model = PaLM(config)
    counts = parameter_counts(config)
    assert counts["total"] == model.num_parameters()
    assert (
        counts["non_embedding"] + counts["embedding"] + counts["output_projection"]
        == (counts["total"])
    )


def test_mfu_reproduces_the_papers_540b_figures():
    # PaLM §4 / App. B: 238.3K tokens/s on 6144 TPU v4 chips (275 TFLOP/s each) is 45.7% MFU
    # without the attention term and 46.2% with it.
    config = ModelConfig.preset("palm-540b")
    peak = 6144 * 275e12
    n = parameter_counts(config)["total"]
    assert 238.3e3 * 6 * n / peak == pytest.approx(0.457, abs=0.0005)
    assert mfu(238.3e3, config, 2048, peak) == pytest.approx(0.462, abs=0.0005)
    assert flops_per_token(config, 2048) == 6 * n + 12 * 118 * 48 * 256 * 2048


def test_memory_counts_weights_grads_and_two_optimizer_moments():
    config = ModelConfig.preset("palm-8b")
    n = parameter_counts(config)["total"]
    mem = training_memory_bytes(config, param_bytes=2)
    assert mem == {"weights": 2 * n, "gradients": 2 * n, "optimizer": 8 * n, "total": 12 * n}


def run_info(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "palm", "info", *args], capture_output=True, text=True, timeout=120
    )


def test_info_command_text_and_json(tmp_path):
    text = run_info("--preset", "palm-62b")
    assert text.returncode == 0, text.stderr
    assert "62.50B" in text.stdout and "FLOPs per token" in text.stdout
    data = json.loads(run_info("--preset", "palm-8b", "--json").stdout)
    assert data["parameters"]["total"] == parameter_counts(ModelConfig.preset("palm-8b"))["total"]
    config = tmp_path / "m.yaml"
    config.write_text("model:\n  preset: palm-s\n  n_layers: 2\n")
    data = json.loads(run_info("--config", str(config), "--json").stdout)
    assert data["config"]["n_layers"] == 2 and data["config"]["d_model"] == 256
    config.write_text("model:\n  n_layer: 2\n")
    bad = run_info("--config", str(config))
    assert bad.returncode != 0 and "unknown model key" in bad.stderr
    assert run_info("--preset", "nope").returncode == 2


def test_per_gpu_memory_plan_shards_under_fsdp_only():
    from palm.flops import per_device_memory_bytes

    config = ModelConfig.preset("palm-8b")
    n = parameter_counts(config)["total"]
    ddp = per_device_memory_bytes(config, 8, "ddp", micro_batch=1, seq_len=2048, param_bytes=2)
    fsdp = per_device_memory_bytes(config, 8, "fsdp", micro_batch=1, seq_len=2048, param_bytes=2)
    assert ddp["weights"] == 2 * n and fsdp["weights"] == -(-2 * n // 8)
    assert fsdp["optimizer"] == -(-8 * n // 8) and fsdp["gathered"] > 0
    remat = per_device_memory_bytes(
        config, 8, "fsdp", micro_batch=1, seq_len=2048, param_bytes=2, checkpointing=True
    )
    assert remat["activations"] < fsdp["activations"]
    double = per_device_memory_bytes(config, 8, "fsdp", micro_batch=2, seq_len=2048, param_bytes=2)
    # Per-token activations double; the output-matrix gradient and loss blocks do not.
    assert fsdp["activations"] < double["activations"] < 2 * fsdp["activations"]


@pytest.mark.parametrize(
    "vocab,d_model,layers,heads,batch,seq",
    [(1000, 64, 2, 2, 4, 128), (4096, 128, 4, 4, 2, 256), (300, 96, 3, 3, 8, 64)],
)
def test_activation_estimate_matches_measured_peak_of_live_tensors(
    vocab, d_model, layers, heads, batch, seq
):
    """The estimate against the profiler's record of every tensor allocated and freed."""
    from palm import PaLM
    from palm.flops import activation_bytes
    from palm.profiling import peak_tensor_bytes

    config = ModelConfig(
        vocab_size=vocab, d_model=d_model, n_layers=layers, n_heads=heads, head_dim=32
    )
    torch.manual_seed(0)
    model = PaLM(config)
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    peak = peak_tensor_bytes(lambda: model(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward())
    estimate = activation_bytes(config, batch, seq, act_bytes=4)
    assert 0.85 * peak < estimate < 1.15 * peak


def test_info_says_whether_a_run_fits_an_80gb_gpu():
    fits = json.loads(
        run_info(
            "--preset",
            "palm-8b",
            "--gpus",
            "8",
            "--parallel",
            "fsdp",
            "--dtype",
            "bfloat16",
            "--activation_checkpointing",
            "--json",
        ).stdout
    )
    assert fits["per_gpu"]["fits"] is True
    one = json.loads(
        run_info("--preset", "palm-62b", "--gpus", "1", "--parallel", "ddp", "--json").stdout
    )
    assert one["per_gpu"]["fits"] is False
    text = run_info("--preset", "palm-62b", "--gpus", "1", "--parallel", "ddp").stdout
    assert "does NOT fit a 80 GiB GPU" in text
