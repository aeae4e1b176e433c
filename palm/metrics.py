"""What a run reports: metrics.jsonl, TensorBoard events, the console and progress bar, and the
peak FLOP/s that MFU (PaLM Appendix B) is measured against."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from palm.config import Config
from palm.flops import mfu
from palm.loss import perplexity_of

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched against
# torch.cuda.get_device_name(). MFU is reported against these (PaLM Appendix B).
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 756e12,  # an unnamed H100 variant: take the lower (PCIe) figure
    "GH200": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 tensor cores (no bf16)
}


def gpu_peak_flops(device_name: str) -> float | None:
    """The table's peak for a CUDA device name, most specific match first; None if unknown."""
    for key in sorted(GPU_PEAK_BF16, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return GPU_PEAK_BF16[key]
    return None


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.3
) -> float:
    """FLOP/s of a square matmul measured now, on this device: the CPU's practical peak.

    The better of two layouts, a @ b and a @ b.T (F.linear's, every nn.Linear's): they can take
    different kernels, e.g. bf16 on a CPU without AVX512 ran a @ b at 0.8 GFLOP/s and a @ b.T at
    16, and a peak below what the model's own matmuls reach would give an MFU above 100%."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    # Warm up for a while, not a product or two: the first ~0.2 s of matmuls in a fresh process
    # ran at 112-124 GFLOP/s where the same CPU then sustained 144-163, and a low peak is an
    # MFU above 100% (the quickstart once reported 105%).
    start = time.perf_counter()
    while time.perf_counter() - start < seconds * 2 / 3:
        a @ b.T
        if device.type == "cuda":
            torch.cuda.synchronize()
    best = 0.0
    for product in (lambda: a @ b, lambda: a @ b.T):
        for _ in range(2):
            product()  # this layout's kernel
        count, start = 0, time.perf_counter()
        while True:
            product()
            count += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / 2:
                break
        best = max(best, 2 * size**3 * count / elapsed)
    return best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for MFU, for the dtype the matmuls run in:
    the data sheet's dense bf16/fp16 tensor-core peak on known GPUs, else (float32 on a GPU,
    unknown GPUs, CPUs) a matmul of that dtype measured now; never a hard-coded default."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name) if dtype in (torch.bfloat16, torch.float16) else None
        if peak is not None:
            return peak, f"{name} data sheet ({dtype})"
        return measure_matmul_peak(device, dtype, size=4096), f"{name} measured {dtype} matmul"
    return measure_matmul_peak(device, dtype), f"{device.type} measured {dtype} matmul"


class MetricsLogger:
    """One JSON object per logged step in metrics.jsonl, mirrored to TensorBoard (tensorboardX)."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.jsonl = None
        self.tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
            for k, v in record.items()
        }
        self.jsonl.write(json.dumps(clean) + "\n")
        self.jsonl.flush()
        step = int(record["step"])
        kind = record.get("kind", "train")
        for key, value in record.items():
            if key not in ("step", "kind", "event", "time") and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(f"{kind}/{key}", value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.flush()
            os.fsync(self.jsonl.fileno())
            self.jsonl.close()
            self.tensorboard.close()


def human_duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.0f} {unit}"
    return f"{seconds:.0f} seconds"


class Eta:
    """One line, after the first few steps of a run: how long the rest takes at the speed just
    measured (the first step, which warms up, is left out), so no run is silently weeks long."""

    def __init__(self, first_step: int, max_steps: int, tokens_per_step: int, device: str) -> None:
        self.first, self.max_steps, self.tokens_per_step = first_step, max_steps, tokens_per_step
        self.device, self.started, self.measured_steps = device, 0.0, 3

    def after(self, step: int) -> str | None:
        """The ETA line once `step` completes the measurement, else None."""
        if step == self.first + 1:
            self.started = time.perf_counter()
        if step != self.first + 1 + self.measured_steps or step >= self.max_steps:
            return None
        per_step = (time.perf_counter() - self.started) / self.measured_steps
        remaining = self.max_steps - step
        seconds = remaining * per_step
        line = (
            f"eta: {remaining:,} more steps ({remaining * self.tokens_per_step:,} tokens) take "
            f"~{human_duration(seconds)} at {self.tokens_per_step / per_step:,.0f} tokens/s "
            f"on this {self.device.upper() if self.device != 'cpu' else 'CPU'}"
        )
        if self.device == "cpu" and seconds > 3 * 3600:
            line += "; for a CPU try --config configs/cpu-quickstart.yaml"
        return line


class Console:
    """Rank 0's view of a run: a tqdm bar on a terminal, else one line per logged step (logs,
    CI). Other ranks print nothing."""

    def __init__(self, initial: int, total: int, enabled: bool, eta: Eta | None = None) -> None:
        from tqdm import tqdm

        self.enabled, self.total, self.eta = enabled, total, eta
        self.bar = tqdm(
            initial=initial,
            total=total,
            unit="step",
            dynamic_ncols=True,
            disable=not (enabled and sys.stderr.isatty()),
        )

    def advance(self, step: int) -> None:
        """The loop reached `step` (forward after a step, backward after a rollback); says the
        ETA once it is measured."""
        self.bar.update(step - self.bar.n)
        if self.eta is not None and (line := self.eta.after(step)):
            self.write(line)

    def train(self, step: int, loss: float, lr: float, tokens_per_s: float, mfu: float) -> None:
        report = dict(
            loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}"
        )
        if not self.bar.disable:
            self.bar.set_postfix(report)
        elif self.enabled:
            line = " ".join(f"{k} {v}" for k, v in report.items())
            print(f"step {step}/{self.total} {line}", flush=True)

    def evaluation(self, step: int, val_loss: float) -> None:
        self.write(
            f"step {step}: validation loss {val_loss:.4f}, perplexity {perplexity_of(val_loss):.2f}"
        )

    def write(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


def plan_line(config: Config, parameters: int, first_step: int, ranks: int, device: str) -> str:
    """What a run will do, said before its first step."""
    d = config.data
    return (
        f"plan: {parameters / 1e6:,.1f}M-parameter PaLM, steps {first_step:,} to "
        f"{config.train.max_steps:,} of {d.batch_size} x {d.seq_len} tokens, on {ranks} x {device}"
    )


class Throughput:
    """Tokens per second and MFU (PaLM Appendix B) over the interval since the last lap."""

    def __init__(self, config: Config, peak_flops: float) -> None:
        self.config, self.peak_flops = config, peak_flops
        self.tokens, self.started = 0, time.perf_counter()
        self.tokens_per_s = self.mfu = 0.0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent in the block (evaluation, checkpoints) is not charged to training."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - began

    def lap(self) -> tuple[float, float]:
        elapsed = time.perf_counter() - self.started
        self.tokens_per_s = self.tokens / max(elapsed, 1e-9)
        self.mfu = mfu(
            self.tokens_per_s, self.config.model, self.config.data.seq_len, self.peak_flops
        )
        self.tokens, self.started = 0, time.perf_counter()
        return self.tokens_per_s, self.mfu


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float | None
    val_perplexity: float | None
    tokens_per_s: float
    mfu: float
    rollbacks: int
    stopped_by: str  # "max_steps", "time_limit" or "signal"
    sample: str | None = None  # text generated at the end (train.sample_tokens)
    is_main: bool = True  # rank 0 (the only one that prints)
